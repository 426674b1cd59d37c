"""A session: one peer connection, its `events` data channel, its conversation and its output timeline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from media_server.pipeline import ConversationMedia, ConversationSetup
from media_server.webrtc_tuning import rtc_configuration, set_audio_jitter_buffer, use_rendered_video_encoder

log = logging.getLogger(__name__)
MAX_TEXT_CHARS = 2000
WATCHDOG_PERIOD_S = 1.0


class Session:
    def __init__(
        self,
        setup: ConversationSetup,
        on_closed: Callable[[Session], None],
    ) -> None:
        self.id = uuid.uuid4().hex
        self.setup = setup
        self.settings = setup.settings
        self.metrics = setup.metrics
        self._on_closed = on_closed
        self.closed = False
        self.channel: RTCDataChannel | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._has_microphone = False
        self.created = time.monotonic()
        self.pc = RTCPeerConnection(rtc_configuration(self.settings))
        self.media = ConversationMedia.open(self.id, setup, self.send_event)
        self.timeline, self.conversation = self.media.timeline, self.media.conversation
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    async def accept(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Answer the client's offer, sending the avatar's audio and video on the kinds it offered."""
        await self.pc.setRemoteDescription(offer)
        offered = {transceiver.kind for transceiver in self.pc.getTransceivers()}
        if "audio" in offered:
            self.pc.addTrack(self.timeline.audio)
        if "video" in offered:
            self.pc.addTrack(self.timeline.video)
            use_rendered_video_encoder(self.pc, self.timeline.video)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._spawn(self.timeline.run())
        self._spawn(self._watchdog())
        return self.pc.localDescription

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not self._has_microphone:
            self._has_microphone = True
            set_audio_jitter_buffer(self.pc, track, self.settings.media.mic_jitter_buffer_packets)
            self._spawn(self.conversation.consume_microphone(track))

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != "events":
            return
        self.channel = channel
        channel.on("message", self._on_message)
        self.send_event(
            {
                "type": "session",
                "session_id": self.id,
                **self.setup.names(),
            }
        )
        self.send_event({"type": "state", "state": "listening"})

    def _on_message(self, message: str | bytes) -> None:
        self.conversation.last_client_activity = time.monotonic()
        try:
            event = json.loads(message)
            kind = event["type"]
        except (ValueError, TypeError, KeyError):
            self.conversation.report_error("bad_message", 'messages must be JSON objects with a "type"')
            return
        if kind in ("text", "say"):
            text = event.get("text")
            if not isinstance(text, str) or not text.strip():
                self.conversation.report_error("bad_message", f'"{kind}" needs a non-empty string "text"')
            elif len(text) > MAX_TEXT_CHARS:
                self.conversation.report_error("bad_message", f"text longer than {MAX_TEXT_CHARS} characters")
            elif kind == "text":
                self.conversation.submit_text(text.strip())
            else:
                self.conversation.say(text.strip())
        elif kind == "interrupt":
            self.conversation.interrupt(reason="client")
        elif kind == "ping":
            self.send_event({"type": "pong"})
        else:
            self.conversation.report_error(
                "bad_message", f"unknown message type {kind!r}; use text, say, interrupt or ping"
            )

    def send_event(self, event: dict[str, object]) -> None:
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps(event))

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    async def _watchdog(self) -> None:
        """Close the session once its client is gone: never connected, or silent for too long."""
        timeout = self.settings.server.client_timeout_s
        while not self.closed:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            now = time.monotonic()
            never_connected = self.pc.connectionState != "connected" and now - self.created > 2 * timeout
            silent = self._has_microphone and now - self.conversation.last_client_activity > timeout
            if never_connected or silent:
                log.info("session %s: client gone, closing", self.id)
                await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.media.close(self.metrics)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        with contextlib.suppress(Exception):
            await self.pc.close()
        self._on_closed(self)

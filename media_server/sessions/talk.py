"""A talk session: one browser's peer connection, its microphone, its `events` data channel, its conversation."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from media_server.conversation.events import Error, Event, Pong, SessionInfo, StateChanged
from media_server.media.webrtc import (
    decode_audio_on_the_loop,
    rtc_configuration,
    set_audio_jitter_buffer,
    use_rendered_video_encoder,
)
from media_server.sessions.base import MediaSession, SessionSetup
from media_server.sessions.messages import BadMessage, Interrupt, Ping, Say, Text, client_message

log = logging.getLogger(__name__)


class TalkSession(MediaSession):
    kind = "talk"

    def __init__(self, setup: SessionSetup, on_closed: Callable[[MediaSession], None]) -> None:
        super().__init__(uuid.uuid4().hex, setup, on_closed)
        self.channel: RTCDataChannel | None = None
        self.has_microphone = False
        self.pc = RTCPeerConnection(rtc_configuration(self.settings))
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    async def accept(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Answer the client's offer, sending the avatar's audio and video on the kinds it offered."""
        await self.pc.setRemoteDescription(offer)
        offered = {transceiver.kind for transceiver in self.pc.getTransceivers()}
        if "audio" in offered:
            self.pc.addTrack(self.output.audio)
        if "video" in offered:
            self.pc.addTrack(self.output.video)
            use_rendered_video_encoder(self.pc, self.output.video)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self.start()
        return self.pc.localDescription

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not self.has_microphone:
            self.has_microphone = True
            set_audio_jitter_buffer(self.pc, track, self.settings.media.mic_jitter_buffer_packets)
            decode_audio_on_the_loop(self.pc, track)
            self.spawn(self.conversation.consume_microphone(track), "microphone")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != "events":
            return
        self.channel = channel
        channel.on("message", self._on_message)
        memory = self.setup.memory
        conversation = {"conversation": memory.id, "resumed": len(memory.history)} if memory else {}
        self.send_event(SessionInfo(self.id, **self.setup.names(), **conversation))
        self.send_event(StateChanged(self.conversation.state))
        self.conversation.greet()

    def _on_message(self, raw: object) -> None:
        """Whatever arrives, the answer is an event or nothing: no message can break the session."""
        conversation = self.conversation
        conversation.last_client_activity = time.monotonic()
        try:
            message = client_message(raw)
        except BadMessage as error:
            conversation.report_error(Error("bad_message", str(error)))
            return
        try:
            match message:
                case Text(text):
                    conversation.submit_text(text)
                case Say(text):
                    conversation.say(text)
                case Interrupt():
                    conversation.interrupt(reason="client")
                case Ping():
                    self.send_event(Pong())
        except Exception:  # a server bug: the client hears of it, the session goes on
            log.exception("talk session %s: handling %s failed", self.id, type(message).__name__)
            conversation.report_error(Error("internal", "the server could not handle that message"))

    def send_event(self, event: Event) -> None:
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            channel.send(event.to_json())

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    async def check_clients(self, now: float) -> str | None:
        server = self.settings.server
        if self.pc.connectionState != "connected" and now - self.created > server.connect_timeout_s:
            return f"never connected within {server.connect_timeout_s:g} s"
        if self.has_microphone and now - self.conversation.last_client_activity > server.client_timeout_s:
            return f"client silent for {server.client_timeout_s:g} s"
        return None

    async def _close_transport(self) -> None:
        await self.pc.close()

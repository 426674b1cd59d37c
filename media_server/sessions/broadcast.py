"""Broadcast sessions: an avatar without a microphone, driven over HTTP, watched by any number of viewers.

A broadcast session has the same output and conversation as a talk session, but no peer of its own.
Programs drive it through the API (``say`` speaks a text as is, ``chat`` answers it as the persona);
people and machines watch it as receive-only *viewers* (WHEP, the /obs page; media/fanout.py), and
it can push itself to streaming services over RTMP (media/rtmp.py).

A broadcast created through the API lives until it is deleted. The default broadcast may also start
by itself when its first viewer arrives (``on_demand``): it then stops once it has had no viewer for
``broadcast.idle_stop_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np
from aiortc import RTCDataChannel, RTCSessionDescription

from media_server.conversation.events import Error, Event, Pong, ReplyFinal, SessionInfo, StateChanged
from media_server.media.fanout import Viewer, pump
from media_server.media.rtmp import RtmpPusher
from media_server.media.webrtc import rtc_configuration
from media_server.sessions.base import MediaSession, SessionSetup
from media_server.sessions.messages import BadMessage, json_object

log = logging.getLogger(__name__)


class ViewerLimitReached(Exception):
    pass


class PushLimitReached(Exception):
    pass


class BroadcastSession(MediaSession):
    kind = "broadcast"

    def __init__(
        self,
        session_id: str,
        setup: SessionSetup,
        on_closed: Callable[[MediaSession], None],
        on_demand: bool = False,
    ) -> None:
        super().__init__(session_id, setup, on_closed)
        self.on_demand = on_demand
        self.viewers: dict[str, Viewer] = {}
        self.pushers: list[RtmpPusher] = []
        self._last_watched = self.created
        self.output.add_frame_listener(self._push_frame)

    def start(self) -> None:
        super().start()
        self.spawn(pump(self.output.audio, self.viewers.values), "audio fan-out")
        self.spawn(pump(self.output.video, self.viewers.values), "video fan-out")

    @property
    def state(self) -> str:
        return self.conversation.state

    # --- viewers ---------------------------------------------------------------------------

    async def add_viewer(self, offer: RTCSessionDescription) -> Viewer:
        """Answer a receive-only offer (its answer is ``viewer.pc.localDescription``)."""
        if len(self.viewers) >= self.settings.broadcast.max_viewers:
            raise ViewerLimitReached(f"broadcast {self.id!r} already has {len(self.viewers)} viewers, its limit")
        viewer = Viewer(rtc_configuration(self.settings))
        viewer.pc.on("datachannel", lambda channel: self._on_viewer_channel(viewer, channel))

        @viewer.pc.on("connectionstatechange")
        async def on_state() -> None:
            if viewer.pc.connectionState in ("failed", "closed"):
                await self.remove_viewer(viewer.id)

        try:
            await viewer.answer(offer)
        except Exception:
            await viewer.close()
            raise
        self.viewers[viewer.id] = viewer
        return viewer

    def _on_viewer_channel(self, viewer: Viewer, channel: RTCDataChannel) -> None:
        if channel.label != "events":
            return
        viewer.channel = channel
        channel.on("message", lambda message: self._on_viewer_message(viewer, message))
        viewer.send(SessionInfo(self.id, **self.setup.names(), broadcast=True, viewer_id=viewer.id).to_json())
        viewer.send(StateChanged(self.conversation.state).to_json())

    def _on_viewer_message(self, viewer: Viewer, raw: object) -> None:
        try:
            is_ping = isinstance(raw, str | bytes) and json_object(raw).get("type") == "ping"
        except BadMessage:
            is_ping = False
        if is_ping:
            viewer.send(Pong().to_json())
            return
        message = f"viewers only watch; drive the broadcast with POST /api/sessions/{self.id}/say or /chat"
        viewer.send(Error("bad_message", message).to_json())

    async def remove_viewer(self, viewer_id: str) -> bool:
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        self._last_watched = time.monotonic()
        await viewer.close()
        self.metrics.frames_dropped.inc(viewer.dropped)
        return True

    async def check_clients(self, now: float) -> str | None:
        """Drop viewers that never connected (their player gave up before ICE completed); an on-demand
        broadcast stops once nobody has watched it for a while."""
        deadline_s = self.settings.server.connect_timeout_s
        for viewer in list(self.viewers.values()):
            if viewer.pc.connectionState != "connected" and now - viewer.created > deadline_s:
                await self.remove_viewer(viewer.id)
        if self.viewers or self.pushers:
            self._last_watched = now
        idle_stop_s = self.settings.broadcast.idle_stop_s
        if self.on_demand and now - self._last_watched > idle_stop_s:
            return f"no viewer for {idle_stop_s:g} s"
        return None

    # --- driving it --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.conversation.say(text)

    async def chat(self, text: str) -> ReplyFinal | Error:
        """Answer ``text`` as the persona: the final reply (or the error that ended the turn) once its text
        is complete; the avatar goes on speaking it after this returns. TimeoutError after
        ``broadcast.reply_timeout_s``."""
        turn = self.conversation.submit_text(text)
        return await asyncio.wait_for(asyncio.shield(turn.outcome), self.settings.broadcast.reply_timeout_s)

    def interrupt(self) -> None:
        self.conversation.interrupt(reason="client")

    def start_rtmp(self, url: str) -> RtmpPusher:
        limit = self.settings.broadcast.max_rtmp_pushes
        if len(self.pushers) >= limit:
            raise PushLimitReached(f"broadcast {self.id!r} already pushes to {limit} RTMP URLs, its limit")
        media = self.settings.media
        pusher = RtmpPusher(url, self.settings.broadcast, media.fps, media.sample_rate)
        pusher.start()
        self.pushers.append(pusher)
        return pusher

    async def stop_rtmp(self) -> int:
        pushers, self.pushers = self.pushers, []
        await asyncio.gather(*(asyncio.to_thread(pusher.stop) for pusher in pushers))
        return len(pushers)

    def _push_frame(self, picture: np.ndarray | None, audio: np.ndarray) -> None:
        for pusher in self.pushers:
            pusher.push(picture, audio)

    # --- events ----------------------------------------------------------------------------

    def send_event(self, event: Event) -> None:
        message = event.to_json()
        for viewer in list(self.viewers.values()):
            viewer.send(message)

    def describe(self) -> dict[str, object]:
        return {
            "session_id": self.id,
            **self.setup.names(),
            "state": self.state,
            "viewers": len(self.viewers),
            "rtmp": [pusher.describe() for pusher in self.pushers],
            "whep_url": f"/whep/{self.id}",
            "obs_url": f"/obs?session={self.id}",
        }

    async def _close_transport(self) -> None:
        await asyncio.gather(*(self.remove_viewer(viewer_id) for viewer_id in list(self.viewers)))
        await self.stop_rtmp()

"""Broadcast sessions: an avatar without a microphone, driven over HTTP, watched by any number of viewers.

A broadcast session has one output timeline, like a talk session, but no peer of its own. Programs
drive it through the API (``/api/sessions…``: ``say`` speaks a text as is, ``chat`` answers it as
the persona); people and machines watch it as receive-only *viewers* (WHEP, the /obs page), and it
can push itself to a streaming service over RTMP.

Fan-out: a pump drains the timeline's two tracks all the time and offers a copy of every frame to
each viewer's own pair of bounded tracks. aiortc's MediaRelay does not fit: it starts reading only
when the first viewer does, so that viewer first gets a backlog of stale frames; it hands one frame
object to every viewer's encoder thread at once, which crashes PyAV (see ``_copier``); and its
buffered queues are unbounded, so one stalled viewer grows memory. Here a viewer joins at the live
edge and a slow one drops only its own frames. Every viewer's peer connection encodes its own video:
the viewer limit bounds that cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

import av
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from engines.avatar import Avatar, AvatarError
from media_server.access import json_error
from media_server.app_state import (
    BROADCASTS,
    METRICS,
    RUNTIME,
    Choices,
    choices_from,
    conversation_setup,
    refusal_when_full,
    update_session_gauge,
)
from media_server.av_output import OutputTrack
from media_server.pipeline import ConversationMedia, ConversationSetup
from media_server.rtmp import RtmpPusher
from media_server.runtime import Runtime
from media_server.session import MAX_TEXT_CHARS
from media_server.webrtc_tuning import rtc_configuration, use_rendered_video_encoder

log = logging.getLogger(__name__)
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
WATCHDOG_PERIOD_S = 1.0


class ViewerLimitReached(Exception):
    pass


def _copier(frame: av.Packet | av.VideoFrame) -> Callable[[], av.Packet | av.VideoFrame]:
    """Copies of ``frame``, one per viewer: each viewer's encoder runs in its own thread and changes the frame
    it encodes (time base, picture type, a cached converter), and a PyAV frame is not safe to share that way.
    Video is converted to the encoders' yuv420p once, here, rather than once per viewer; audio comes
    already encoded, and every viewer sends the same Opus packets."""
    if isinstance(frame, av.VideoFrame):
        pixels = frame.to_ndarray(format="yuv420p")

        def make() -> av.Packet | av.VideoFrame:
            return av.VideoFrame.from_ndarray(pixels, format="yuv420p")
    else:
        payload = bytes(frame)

        def make() -> av.Packet | av.VideoFrame:
            return av.Packet(payload)

    def copy() -> av.Packet | av.VideoFrame:
        made = make()
        made.pts, made.time_base = frame.pts, frame.time_base
        return made

    return copy


class Viewer:
    """One receive-only peer: its own tracks (fed by the session's pump) and, if it asked, an `events` channel."""

    def __init__(self, configuration: RTCConfiguration) -> None:
        self.id = uuid.uuid4().hex
        self.pc = RTCPeerConnection(configuration)
        self.tracks = {"audio": OutputTrack("audio"), "video": OutputTrack("video")}
        self.channel: RTCDataChannel | None = None
        self.created = time.monotonic()

    def send(self, message: str) -> None:
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            channel.send(message)

    async def close(self) -> None:
        for track in self.tracks.values():
            track.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()


class BroadcastSession:
    def __init__(
        self,
        *,
        session_id: str,
        setup: ConversationSetup,
        on_closed: Callable[[BroadcastSession], None],
    ) -> None:
        self.id = session_id
        self.setup = setup
        self.settings = setup.settings
        self.metrics = setup.metrics
        self._on_closed = on_closed
        self.closed = False
        self.state = "listening"
        self.viewers: dict[str, Viewer] = {}
        self.pushers: list[RtmpPusher] = []
        self._reply_waiters: list[asyncio.Future[dict[str, object]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.media = ConversationMedia.open(session_id, setup, self._on_event)
        self.timeline, self.conversation = self.media.timeline, self.media.conversation
        self.timeline.on_frame = self._on_frame

    def start(self) -> None:
        self._spawn(self.timeline.run())
        self._spawn(self._pump(self.timeline.audio))
        self._spawn(self._pump(self.timeline.video))
        self._spawn(self._watchdog())

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- media fan-out ---------------------------------------------------------

    async def _pump(self, source: OutputTrack) -> None:
        while True:
            try:
                frame = await source.recv()
            except MediaStreamError:
                return
            viewers = list(self.viewers.values())
            if viewers:
                copy = _copier(frame)
                for viewer in viewers:
                    viewer.tracks[source.kind].offer(copy())

    def _on_frame(self, picture: np.ndarray | None, audio: np.ndarray) -> None:
        for pusher in self.pushers:
            pusher.push(picture, audio)

    # --- viewers -----------------------------------------------------------------

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
            await viewer.pc.setRemoteDescription(offer)
            kinds = {transceiver.kind for transceiver in viewer.pc.getTransceivers()}
            if not kinds & {"audio", "video"}:
                raise ValueError("the offer has neither audio nor video to receive")
            for kind in sorted(kinds & {"audio", "video"}):
                viewer.pc.addTrack(viewer.tracks[kind])
            if "video" in kinds:
                use_rendered_video_encoder(viewer.pc, viewer.tracks["video"])
            await viewer.pc.setLocalDescription(await viewer.pc.createAnswer())
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
        viewer.send(json.dumps({**self._session_event(), "viewer_id": viewer.id}))
        viewer.send(json.dumps({"type": "state", "state": self.state}))

    def _on_viewer_message(self, viewer: Viewer, message: str | bytes) -> None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            if json.loads(message).get("type") == "ping":
                viewer.send(json.dumps({"type": "pong"}))
                return
        viewer.send(
            json.dumps(
                {
                    "type": "error",
                    "code": "bad_message",
                    "message": f"viewers only watch; drive the broadcast with POST /api/sessions/{self.id}/say or /chat",
                }
            )
        )

    async def remove_viewer(self, viewer_id: str) -> bool:
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        await viewer.close()
        self.metrics.frames_dropped.inc(viewer.tracks["audio"].dropped + viewer.tracks["video"].dropped)
        return True

    async def _watchdog(self) -> None:
        """Drop viewers that never connected (their player gave up before ICE completed)."""
        deadline_s = 2 * self.settings.server.client_timeout_s
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            now = time.monotonic()
            for viewer in list(self.viewers.values()):
                if viewer.pc.connectionState != "connected" and now - viewer.created > deadline_s:
                    await self.remove_viewer(viewer.id)

    # --- driving it ----------------------------------------------------------------

    def say(self, text: str) -> None:
        self.conversation.say(text)

    async def chat(self, text: str) -> dict[str, object]:
        """Answer ``text`` as the persona; returns the final ``reply`` event (or the ``error`` that ended the turn).

        The avatar goes on speaking the reply after this returns: the text is complete before the speech is.
        """
        self.conversation.submit_text(text)
        # Registered after submit_text: the final reply of a turn it interrupted was emitted during the call.
        waiter: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self._reply_waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, self.settings.broadcast.reply_timeout_s)
        finally:
            self._reply_waiters.remove(waiter)

    def interrupt(self) -> None:
        self.conversation.interrupt(reason="client")

    def start_rtmp(self, url: str) -> RtmpPusher:
        media = self.settings.media
        pusher = RtmpPusher(url, self.settings.broadcast, media.fps, media.sample_rate)
        pusher.start()
        self.pushers.append(pusher)
        return pusher

    async def stop_rtmp(self) -> int:
        pushers, self.pushers = self.pushers, []
        await asyncio.gather(*(asyncio.to_thread(pusher.stop) for pusher in pushers))
        return len(pushers)

    # --- events ----------------------------------------------------------------------

    def _session_event(self) -> dict[str, object]:
        return {
            "type": "session",
            "session_id": self.id,
            **self.setup.names(),
            "broadcast": True,
        }

    def _on_event(self, event: dict[str, object]) -> None:
        if event.get("type") == "state":
            self.state = str(event["state"])
        message = json.dumps(event)
        for viewer in list(self.viewers.values()):
            viewer.send(message)
        ends_turn = (event.get("type") == "reply" and event.get("final")) or (
            event.get("type") == "error" and event.get("code") == "turn_failed"
        )
        if ends_turn:
            for waiter in self._reply_waiters:
                if not waiter.done():
                    waiter.set_result(event)

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

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for waiter in self._reply_waiters:
            if not waiter.done():
                waiter.set_result(
                    {"type": "error", "code": "session_closed", "message": "the broadcast session was closed"}
                )
        self.media.close(self.metrics)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self.remove_viewer(viewer_id) for viewer_id in list(self.viewers)))
        await self.stop_rtmp()
        self._on_closed(self)


# --- the HTTP API: /api/sessions… ------------------------------------------------------


async def _json_body(request: web.Request, *, optional: bool = False) -> dict[str, object]:
    if optional and not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def _text(body: dict[str, object]) -> str:
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise web.HTTPBadRequest(text='body needs a non-empty string "text"')
    if len(text) > MAX_TEXT_CHARS:
        raise web.HTTPBadRequest(text=f"text longer than {MAX_TEXT_CHARS} characters")
    return text.strip()


def _rtmp_url(value: object) -> str:
    if not isinstance(value, str) or not value.startswith(("rtmp://", "rtmps://")):
        raise web.HTTPBadRequest(text='"rtmp_url" must be an rtmp:// or rtmps:// URL')
    return value


def broadcast_of(request: web.Request) -> BroadcastSession:
    session_id = request.match_info.get("session_id") or request.app[RUNTIME].settings.broadcast.default_id
    session = request.app[BROADCASTS].get(session_id)
    if session is None:
        raise web.HTTPNotFound(text=f"no broadcast session {session_id!r}; create it with POST /api/sessions")
    return session


async def load_avatar(runtime: Runtime, name: str) -> Avatar:
    avatar = await asyncio.to_thread(runtime.avatars.get, name)
    await asyncio.to_thread(runtime.engines.lipsync.prepare, avatar)
    return avatar


def start_broadcast(app: web.Application, session_id: str, chosen: Choices, avatar: Avatar) -> BroadcastSession:
    """Create and start a broadcast session. Synchronous, so that checking the id is free and taking it
    cannot be split by another request; the caller checks both that and capacity just before."""
    runtime = app[RUNTIME]
    session = BroadcastSession(
        session_id=session_id,
        setup=conversation_setup(runtime, app[METRICS], avatar, chosen),
        on_closed=lambda s: _forget(app, s),
    )
    app[BROADCASTS][session_id] = session
    app[METRICS].sessions_total.inc()
    update_session_gauge(app)
    session.start()
    return session


def _forget(app: web.Application, session: BroadcastSession) -> None:
    if app[BROADCASTS].get(session.id) is session:
        del app[BROADCASTS][session.id]
    update_session_gauge(app)


async def create_session(request: web.Request) -> web.Response:
    body = await _json_body(request, optional=True)
    session_id = body.get("id", uuid.uuid4().hex)
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise web.HTTPBadRequest(text='"id" must be 1 to 64 letters, digits, "-" or "_"')
    rtmp_url = _rtmp_url(body["rtmp_url"]) if body.get("rtmp_url") is not None else None
    chosen = choices_from(body, request.app[RUNTIME])
    try:
        avatar = await load_avatar(request.app[RUNTIME], chosen.avatar)
    except AvatarError as error:
        return json_error(422, "bad_avatar", f"avatar {chosen.avatar!r} cannot be used: {error}")
    if session_id in request.app[BROADCASTS]:
        return json_error(409, "session_exists", f"broadcast session {session_id!r} exists already")
    if (full := refusal_when_full(request.app)) is not None:
        return full
    session = start_broadcast(request.app, session_id, chosen, avatar)
    if rtmp_url is not None:
        session.start_rtmp(rtmp_url)
    return web.json_response(session.describe(), status=201, headers={"Location": f"/api/sessions/{session_id}"})


async def list_sessions(request: web.Request) -> web.Response:
    return web.json_response({"sessions": [s.describe() for s in request.app[BROADCASTS].values()]})


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(broadcast_of(request).describe())


async def delete_session(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    await session.close()
    return web.json_response({"closed": session.id})


async def say(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    session.say(_text(await _json_body(request)))
    return web.json_response({"session_id": session.id, "speaking": True}, status=202)


async def chat(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    text = _text(await _json_body(request))
    try:
        event = await session.chat(text)
    except TimeoutError:
        timeout = session.settings.broadcast.reply_timeout_s
        return json_error(504, "reply_timeout", f"no reply within {timeout:g} s (broadcast.reply_timeout_s)")
    if event["type"] == "error":
        status = 410 if event["code"] == "session_closed" else 502
        return json_error(status, str(event["code"]), str(event["message"]))
    return web.json_response(
        {
            "session_id": session.id,
            "turn": event.get("turn"),
            "reply": event["text"],
            "interrupted": bool(event.get("interrupted")),
        }
    )


async def interrupt(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    session.interrupt()
    return web.json_response({"session_id": session.id, "state": session.state})


async def start_rtmp(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    pusher = session.start_rtmp(_rtmp_url((await _json_body(request)).get("rtmp_url")))
    return web.json_response(pusher.describe(), status=201)


async def stop_rtmp(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    return web.json_response({"session_id": session.id, "stopped": await session.stop_rtmp()})


async def start_configured_broadcast(app: web.Application) -> None:
    """With broadcast.rtmp_url set (``facecast serve --rtmp URL``), the default broadcast starts with the server."""
    runtime = app[RUNTIME]
    settings = runtime.settings.broadcast
    if settings.rtmp_url is not None:
        chosen = choices_from({}, runtime)
        session = start_broadcast(app, settings.default_id, chosen, await load_avatar(runtime, chosen.avatar))
        session.start_rtmp(settings.rtmp_url)


async def close_broadcasts(app: web.Application) -> None:
    await asyncio.gather(*(s.close() for s in list(app[BROADCASTS].values())))


def add_broadcast_routes(app: web.Application) -> None:
    app[BROADCASTS] = {}
    routes = app.router
    routes.add_post("/api/sessions", create_session)
    routes.add_get("/api/sessions", list_sessions)
    routes.add_get("/api/sessions/{session_id}", get_session)
    routes.add_delete("/api/sessions/{session_id}", delete_session)
    routes.add_post("/api/sessions/{session_id}/say", say)
    routes.add_post("/api/sessions/{session_id}/chat", chat)
    routes.add_post("/api/sessions/{session_id}/interrupt", interrupt)
    routes.add_post("/api/sessions/{session_id}/rtmp", start_rtmp)
    routes.add_delete("/api/sessions/{session_id}/rtmp", stop_rtmp)
    app.on_startup.append(start_configured_broadcast)
    app.on_shutdown.append(close_broadcasts)

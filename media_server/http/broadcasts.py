"""The broadcast API (``/api/sessions…``): create, drive, watch and stop broadcast sessions."""

from __future__ import annotations

import uuid

from aiohttp import web

from media_server.conversation.events import Error
from media_server.http.cluster import placed_elsewhere
from media_server.http.errors import ApiError, busy, field, json_body
from media_server.http.opening import Choices, choices_from, fetch_avatar_named, session_setup
from media_server.http.state import RUNTIME, SESSIONS
from media_server.sessions.broadcast import BroadcastSession, PushLimitReached
from media_server.sessions.messages import BadMessage, checked_session_id, checked_text
from media_server.sessions.registry import ServerFull, SessionExists


def _rtmp_url(value: object) -> str:
    if not isinstance(value, str) or not value.startswith(("rtmp://", "rtmps://")) or len(value) > 2048:
        raise BadMessage('"rtmp_url" must be an rtmp:// or rtmps:// URL')
    return value


async def open_broadcast(
    app: web.Application, session_id: str, chosen: Choices, *, on_demand: bool = False
) -> BroadcastSession:
    """Create and start a broadcast session (409 if the id is taken, 503 when the server is full)."""
    sessions = app[SESSIONS]
    try:
        reservation = sessions.reserve(session_id)
    except SessionExists as error:
        raise ApiError(409, "session_exists", str(error)) from None
    except ServerFull as error:
        raise busy("server_full", str(error)) from None
    with reservation as slot:
        session = BroadcastSession(session_id, await session_setup(app, chosen), sessions.forget, on_demand)
        session.start()
        slot.commit(session)
    return session


def broadcast_of(request: web.Request) -> BroadcastSession:
    session_id = request.match_info.get("session_id") or request.app[RUNTIME].settings.broadcast.default_id
    session = request.app[SESSIONS].broadcasts.get(session_id)
    if session is None:
        raise ApiError(
            404, "not_found", f"no broadcast session {session_id[:64]!r}; create it with POST /api/sessions"
        )
    return session


def _start_rtmp(session: BroadcastSession, url: str) -> dict[str, object]:
    try:
        return session.start_rtmp(url).describe()
    except PushLimitReached as error:
        raise ApiError(409, "too_many_pushes", f"{error} (broadcast.max_rtmp_pushes)") from None


async def create_session(request: web.Request) -> web.Response:
    body = await json_body(request, optional=True)
    session_id = field(body, "id", checked_session_id) if body.get("id") is not None else uuid.uuid4().hex
    rtmp_url = field(body, "rtmp_url", _rtmp_url) if body.get("rtmp_url") is not None else None
    await fetch_avatar_named(request.app, body)
    chosen = choices_from(body, request.app[RUNTIME])
    if (answer := await placed_elsewhere(request)) is not None:
        return answer
    session = await open_broadcast(request.app, session_id, chosen)
    if rtmp_url is not None:
        _start_rtmp(session, rtmp_url)
    return web.json_response(session.describe(), status=201, headers={"Location": f"/api/sessions/{session_id}"})


async def list_sessions(request: web.Request) -> web.Response:
    return web.json_response({"sessions": [s.describe() for s in request.app[SESSIONS].broadcasts.values()]})


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(broadcast_of(request).describe())


async def delete_session(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    await session.close()
    return web.json_response({"closed": session.id})


async def say(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    session.say(field(await json_body(request), "text", checked_text))
    return web.json_response({"session_id": session.id, "speaking": True}, status=202)


async def chat(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    text = field(await json_body(request), "text", checked_text)
    try:
        outcome = await session.chat(text)
    except TimeoutError:
        timeout = session.settings.broadcast.reply_timeout_s
        raise ApiError(504, "reply_timeout", f"no reply within {timeout:g} s (broadcast.reply_timeout_s)") from None
    if isinstance(outcome, Error):
        raise ApiError(410 if outcome.code == "session_closed" else 502, outcome.code, outcome.message)
    return web.json_response(
        {"session_id": session.id, "turn": outcome.turn, "reply": outcome.text, "interrupted": outcome.interrupted}
    )


async def interrupt(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    session.interrupt()
    return web.json_response({"session_id": session.id, "state": session.state})


async def start_rtmp(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    url = field(await json_body(request), "rtmp_url", _rtmp_url)
    return web.json_response(_start_rtmp(session, url), status=201)


async def stop_rtmp(request: web.Request) -> web.Response:
    session = broadcast_of(request)
    return web.json_response({"session_id": session.id, "stopped": await session.stop_rtmp()})


async def start_configured_broadcast(app: web.Application) -> None:
    """With broadcast.rtmp_url set (``facecast serve --rtmp URL``), the default broadcast starts with the server."""
    runtime = app[RUNTIME]
    settings = runtime.settings.broadcast
    if settings.rtmp_url is not None:
        session = await open_broadcast(app, settings.default_id, choices_from({}, runtime))
        session.start_rtmp(settings.rtmp_url)

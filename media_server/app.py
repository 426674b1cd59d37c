"""The HTTP side: WebRTC signalling, session control, health, metrics and the pages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiortc import RTCSessionDescription

from engines.avatar import AvatarError
from media_server.metrics import ServerMetrics
from media_server.runtime import Runtime
from media_server.session import Session

log = logging.getLogger(__name__)
RUNTIME = web.AppKey("runtime", Runtime)
SESSIONS = web.AppKey("sessions", dict)
METRICS = web.AppKey("metrics", ServerMetrics)
RETRY_AFTER_S = 10


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


@web.middleware
async def errors_as_json(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure becomes a JSON body with a status; no stack trace ever reaches a client."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[RUNTIME].settings.server.max_body_bytes
        return json_error(413, "too_large", f"request body over the limit of {limit} bytes")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return json_error(error.status, error.reason.lower().replace(" ", "_"), error.text or error.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal", "internal server error; the server log has the details")


def _choice(requested: object, available: list[str], kind: str, default: str) -> str:
    if requested is None:
        return default
    if not isinstance(requested, str) or requested not in available:
        raise web.HTTPNotFound(text=f"unknown {kind} {requested!r}; available: {', '.join(available)}")
    return requested


async def _read_offer(request: web.Request) -> dict[str, object]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="body must be JSON: {\"sdp\": ..., \"type\": \"offer\"}") from None
    if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
        raise web.HTTPBadRequest(text='body must be a JSON object with a string "sdp" and "type": "offer"')
    if "m=" not in body["sdp"] or not body["sdp"].startswith("v=0"):
        raise web.HTTPBadRequest(text="sdp is not a session description (it must start with v=0 and hold m= lines)")
    return body


async def offer(request: web.Request) -> web.Response:
    runtime, sessions = request.app[RUNTIME], request.app[SESSIONS]
    body = await _read_offer(request)
    server = runtime.settings.server
    avatar_name = _choice(body.get("avatar"), runtime.avatars.names(), "avatar", server.default_avatar)
    persona_name = _choice(body.get("persona"), list(runtime.personas), "persona", server.default_persona)
    voice = _choice(body.get("voice"), runtime.engines.tts.voices, "voice", runtime.voice_for(persona_name))
    if len(sessions) >= server.max_sessions:
        return json_error(
            503, "server_full", f"all {server.max_sessions} sessions are in use; try again shortly",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    try:
        avatar = await asyncio.to_thread(runtime.avatars.get, avatar_name)
        await asyncio.to_thread(runtime.engines.lipsync.prepare, avatar)
    except AvatarError as error:
        return json_error(422, "bad_avatar", f"avatar {avatar_name!r} cannot be used: {error}")
    session = Session(
        settings=runtime.settings,
        engines=runtime.engines,
        metrics=request.app[METRICS],
        avatar=avatar,
        persona=runtime.personas[persona_name],
        voice=voice,
        on_closed=lambda s: _forget(request.app, s),
    )
    sessions[session.id] = session
    request.app[METRICS].sessions.set(len(sessions))
    request.app[METRICS].sessions_total.inc()
    try:
        answer = await session.accept(RTCSessionDescription(sdp=body["sdp"], type="offer"))
    except Exception as error:  # aiortc rejects malformed SDP with assorted exception types
        await session.close()
        return json_error(400, "bad_sdp", f"the offer could not be accepted: {error}")
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.id})


def _forget(app: web.Application, session: Session) -> None:
    app[SESSIONS].pop(session.id, None)
    app[METRICS].sessions.set(len(app[SESSIONS]))


async def delete_session(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    if session is None:
        return json_error(404, "no_session", "no such session (it may have ended already)")
    await session.close()
    return web.json_response({"closed": session.id})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "sessions": len(request.app[SESSIONS])})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def options(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    server = runtime.settings.server
    return web.json_response(
        {
            "avatars": runtime.avatars.names(),
            "personas": {name: p.display_name for name, p in runtime.personas.items()},
            "voices": runtime.engines.tts.voices,
            "defaults": {"avatar": server.default_avatar, "persona": server.default_persona},
            "ice_servers": [s.model_dump(exclude_none=True) for s in server.ice_servers],
        }
    )


def _page(name: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(request.app[RUNTIME].settings.server.static_dir / name)

    return serve


async def _close_sessions(app: web.Application) -> None:
    await asyncio.gather(*(s.close() for s in list(app[SESSIONS].values())))


def create_app(runtime: Runtime) -> web.Application:
    app = web.Application(client_max_size=runtime.settings.server.max_body_bytes, middlewares=[errors_as_json])
    app[RUNTIME] = runtime
    app[SESSIONS] = {}
    app[METRICS] = ServerMetrics()
    app.router.add_post("/offer", offer)
    app.router.add_delete("/sessions/{session_id}", delete_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/options", options)
    app.router.add_get("/", _page("index.html"))
    app.router.add_static("/static/", runtime.settings.server.static_dir)
    app.on_shutdown.append(_close_sessions)
    return app


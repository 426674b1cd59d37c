"""The HTTP side: WebRTC signalling, session control, health, metrics and the pages.

Broadcast sessions and their API live in broadcast.py, WHEP in whep.py, who may call what in access.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiortc import RTCSessionDescription

from engines.avatar import AvatarError
from media_server.access import access_middleware, json_error
from media_server.app_state import (
    AVATAR_MASKS,
    BROADCASTS,
    METRICS,
    RUNTIME,
    SESSIONS,
    choices_from,
    conversation_setup,
    refusal_when_full,
    update_session_gauge,
)
from media_server.broadcast import add_broadcast_routes
from media_server.metrics import ServerMetrics
from media_server.runtime import Runtime
from media_server.segmentation import mask_png
from media_server.session import Session
from media_server.whep import add_whep_routes

log = logging.getLogger(__name__)


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
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


async def _read_offer(request: web.Request) -> dict[str, object]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text='body must be JSON: {"sdp": ..., "type": "offer"}') from None
    if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
        raise web.HTTPBadRequest(text='body must be a JSON object with a string "sdp" and "type": "offer"')
    if "m=" not in body["sdp"] or not body["sdp"].startswith("v=0"):
        raise web.HTTPBadRequest(text="sdp is not a session description (it must start with v=0 and hold m= lines)")
    return body


async def offer(request: web.Request) -> web.Response:
    runtime, sessions = request.app[RUNTIME], request.app[SESSIONS]
    body = await _read_offer(request)
    chosen = choices_from(body, runtime)
    if (full := refusal_when_full(request.app)) is not None:
        return full
    try:
        avatar = await asyncio.to_thread(runtime.avatars.get, chosen.avatar)
        await asyncio.to_thread(runtime.engines.lipsync.prepare, avatar)
    except AvatarError as error:
        return json_error(422, "bad_avatar", f"avatar {chosen.avatar!r} cannot be used: {error}")
    session = Session(
        setup=conversation_setup(runtime, request.app[METRICS], avatar, chosen),
        on_closed=lambda s: _forget(request.app, s),
    )
    sessions[session.id] = session
    update_session_gauge(request.app)
    request.app[METRICS].sessions_total.inc()
    try:
        answer = await session.accept(RTCSessionDescription(sdp=body["sdp"], type="offer"))
    except Exception as error:  # aiortc rejects malformed SDP with assorted exception types
        await session.close()
        return json_error(400, "bad_sdp", f"the offer could not be accepted: {error}")
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.id})


def _forget(app: web.Application, session: Session) -> None:
    app[SESSIONS].pop(session.id, None)
    update_session_gauge(app)


async def delete_session(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].get(request.match_info["session_id"])
    if session is None:
        return json_error(404, "no_session", "no such session (it may have ended already)")
    await session.close()
    return web.json_response({"closed": session.id})


async def healthz(request: web.Request) -> web.Response:
    """Answers once the server listens, which is after every engine has loaded and warmed up."""
    engines = request.app[RUNTIME].engines.descriptions
    return web.json_response(
        {
            "status": "ok",
            "engines": {stage: description["engine"] for stage, description in engines.items()},
            "sessions": len(request.app[SESSIONS]),
            "broadcasts": len(request.app[BROADCASTS]),
        }
    )


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
            "ice_transport_policy": "relay" if server.relay_only else "all",
        }
    )


async def avatar_mask(request: web.Request) -> web.Response:
    """The avatar cut out from its background (PNG, white with the person as alpha), for /obs backdrops."""
    runtime, masks = request.app[RUNTIME], request.app[AVATAR_MASKS]
    name = request.match_info["name"]
    if name not in runtime.avatars.names():
        raise web.HTTPNotFound(text=f"unknown avatar {name!r}; available: {', '.join(runtime.avatars.names())}")
    if name not in masks:
        try:
            avatar = await asyncio.to_thread(runtime.avatars.get, name)
        except AvatarError as error:
            return json_error(422, "bad_avatar", f"avatar {name!r} cannot be used: {error}")
        masks[name] = await asyncio.to_thread(mask_png, avatar)
    return web.Response(body=masks[name], content_type="image/png", headers={"Cache-Control": "max-age=3600"})


def _page(name: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(request.app[RUNTIME].settings.server.static_dir / name)

    return serve


async def _close_sessions(app: web.Application) -> None:
    await asyncio.gather(*(s.close() for s in list(app[SESSIONS].values())))


def create_app(runtime: Runtime) -> web.Application:
    server = runtime.settings.server
    app = web.Application(
        client_max_size=server.max_body_bytes, middlewares=[access_middleware(server), errors_as_json]
    )
    app[RUNTIME] = runtime
    app[SESSIONS] = {}
    app[METRICS] = ServerMetrics()
    app[AVATAR_MASKS] = {}
    app.router.add_post("/offer", offer)
    app.router.add_delete("/sessions/{session_id}", delete_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/options", options)
    app.router.add_get("/api/avatars/{name}/mask.png", avatar_mask)
    add_broadcast_routes(app)
    add_whep_routes(app)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/kiosk", _page("kiosk.html"))
    app.router.add_get("/obs", _page("obs.html"))
    app.router.add_get("/embed.js", _page("embed.js"))
    app.router.add_static("/static/", server.static_dir)
    app.on_shutdown.append(_close_sessions)
    return app

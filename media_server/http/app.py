"""The HTTP side of the server, as one route table: every API, who may call it, and the handler that serves it.

Where to add an API: write its handler in the module of its kind (talk.py, broadcasts.py, whep.py,
info.py, or a new one) and add one ``Route`` below with its access (http/access.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from media_server.http import broadcasts, info, knowledge, talk, whep
from media_server.http.access import Access, access_middleware
from media_server.http.errors import ApiError, Handler, errors_as_json
from media_server.http.limits import OfferLimiter
from media_server.http.state import AVATAR_MASKS, METRICS, OFFER_LIMITER, ON_DEMAND_START, RUNTIME, SESSIONS
from media_server.metrics import ServerMetrics
from media_server.runtime import Runtime
from media_server.sessions.registry import SessionRegistry

PAGES = {"/": "index.html", "/kiosk": "kiosk.html", "/obs": "obs.html", "/embed.js": "embed.js"}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    access: Access


ROUTES = (
    # Talk sessions: a browser's peer connection.
    Route("POST", "/offer", talk.offer, Access.CLIENT),
    Route("DELETE", "/sessions/{session_id}", talk.delete_session, Access.CLIENT),
    # Broadcast sessions, driven by programs.
    Route("POST", "/api/sessions", broadcasts.create_session, Access.CONTROL),
    Route("GET", "/api/sessions", broadcasts.list_sessions, Access.CONTROL),
    Route("GET", "/api/sessions/{session_id}", broadcasts.get_session, Access.CONTROL),
    Route("DELETE", "/api/sessions/{session_id}", broadcasts.delete_session, Access.CONTROL),
    Route("POST", "/api/sessions/{session_id}/say", broadcasts.say, Access.CONTROL),
    Route("POST", "/api/sessions/{session_id}/chat", broadcasts.chat, Access.CONTROL),
    Route("POST", "/api/sessions/{session_id}/interrupt", broadcasts.interrupt, Access.CONTROL),
    Route("POST", "/api/sessions/{session_id}/rtmp", broadcasts.start_rtmp, Access.CONTROL),
    Route("DELETE", "/api/sessions/{session_id}/rtmp", broadcasts.stop_rtmp, Access.CONTROL),
    # Documents the personas answer from: the talk page's upload, and OPEA-compatible data prep.
    Route("POST", "/api/knowledge/{base}/documents", knowledge.upload, Access.CONTROL),
    Route("POST", "/v1/dataprep/ingest", knowledge.dataprep_ingest, Access.CONTROL),
    Route("POST", "/v1/dataprep/get", knowledge.dataprep_get, Access.CONTROL),
    Route("POST", "/v1/dataprep/delete", knowledge.dataprep_delete, Access.CONTROL),
    # Watching a broadcast.
    Route("POST", "/whep", whep.offer, Access.CLIENT),
    Route("POST", "/whep/{session_id}", whep.offer, Access.CLIENT),
    Route("DELETE", "/whep/{session_id}/{viewer_id}", whep.stop, Access.CLIENT),
    # About the server.
    Route("GET", "/api/options", info.options, Access.CLIENT),
    Route("GET", "/api/avatars/{name}/mask.png", info.avatar_mask, Access.CLIENT),
    Route("GET", "/healthz", info.healthz, Access.PAGE),
    Route("GET", "/metrics", info.metrics, Access.PAGE),
)


def _page(name: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(request.app[RUNTIME].settings.server.static_dir / name)

    return serve


async def static_file(request: web.Request) -> web.FileResponse:
    """A file of the pages (static/); anything else, however its path is spelt, is the JSON 404."""
    root = request.app[RUNTIME].settings.server.static_dir.resolve()
    path = (root / request.match_info["path"]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError(404, "not_found", "no such file")
    return web.FileResponse(path)


def create_app(runtime: Runtime) -> web.Application:
    server = runtime.settings.server
    access: dict[AbstractRoute, Access] = {}
    # errors_as_json twice: inside, so the access layer can add CORS headers to every error a handler
    # gives; outside, for the access layer's own refusals.
    middlewares = [errors_as_json, access_middleware(server, lambda route: access.get(route, Access.PAGE)), errors_as_json]
    app = web.Application(client_max_size=server.max_body_bytes, middlewares=middlewares)
    app[RUNTIME] = runtime
    app[METRICS] = metrics = ServerMetrics()
    app[SESSIONS] = SessionRegistry(server.max_sessions, metrics)
    app[OFFER_LIMITER] = OfferLimiter(server.offers_per_minute)
    app[ON_DEMAND_START] = asyncio.Lock()
    app[AVATAR_MASKS] = {}
    for route in ROUTES:
        access[app.router.add_route(route.method, route.path, route.handler)] = route.access
    for path, page in PAGES.items():
        app.router.add_get(path, _page(page))
    app.router.add_get("/static/{path:.+}", static_file)
    app.on_startup.append(broadcasts.start_configured_broadcast)
    app.on_shutdown.append(lambda app: app[SESSIONS].close_all())
    return app

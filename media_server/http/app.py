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

from media_server.http import api_docs as docs
from media_server.http import broadcasts, cluster, info, knowledge, opea, openai_api, talk, whep
from media_server.http.access import Access, access_middleware
from media_server.http.errors import ApiError, Handler, errors_as_json
from media_server.http.limits import OfferLimiter
from media_server.http.openapi import Operation, openapi_json
from media_server.http.state import (
    AVATAR_MASKS,
    CLUSTER,
    METRICS,
    OFFER_LIMITER,
    ON_DEMAND_START,
    ROUTE_TABLE,
    RUNTIME,
    SERVICE,
    SESSIONS,
)
from media_server.metrics import ServerMetrics
from media_server.runtime import Runtime
from media_server.service.service import ModelService
from media_server.sessions.registry import SessionRegistry

PAGES = {"/": "index.html", "/kiosk": "kiosk.html", "/obs": "obs.html", "/embed.js": "embed.js"}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    access: Access
    doc: Operation  # what /openapi.json says of it
    uploads: bool = False  # its requests carry audio: bodies up to api.max_body_bytes, not server.max_body_bytes
    session_owned: bool = False  # in a cluster, served by the node that owns the session it names


ROUTES = (
    # Talk sessions: a browser's peer connection.
    Route("POST", "/offer", talk.offer, Access.CLIENT, docs.OFFER),
    Route("DELETE", "/sessions/{session_id}", talk.delete_session, Access.CLIENT, docs.DELETE_TALK, session_owned=True),
    # Broadcast sessions, driven by programs.
    Route("POST", "/api/sessions", broadcasts.create_session, Access.CONTROL, docs.CREATE_BROADCAST),
    Route("GET", "/api/sessions", broadcasts.list_sessions, Access.CONTROL, docs.LIST_BROADCASTS),
    Route(
        "GET",
        "/api/sessions/{session_id}",
        broadcasts.get_session,
        Access.CONTROL,
        docs.GET_BROADCAST,
        session_owned=True,
    ),
    Route(
        "DELETE",
        "/api/sessions/{session_id}",
        broadcasts.delete_session,
        Access.CONTROL,
        docs.DELETE_BROADCAST,
        session_owned=True,
    ),
    Route("POST", "/api/sessions/{session_id}/say", broadcasts.say, Access.CONTROL, docs.SAY, session_owned=True),
    Route("POST", "/api/sessions/{session_id}/chat", broadcasts.chat, Access.CONTROL, docs.CHAT, session_owned=True),
    Route(
        "POST",
        "/api/sessions/{session_id}/interrupt",
        broadcasts.interrupt,
        Access.CONTROL,
        docs.INTERRUPT,
        session_owned=True,
    ),
    Route(
        "POST",
        "/api/sessions/{session_id}/rtmp",
        broadcasts.start_rtmp,
        Access.CONTROL,
        docs.START_RTMP,
        session_owned=True,
    ),
    Route(
        "DELETE",
        "/api/sessions/{session_id}/rtmp",
        broadcasts.stop_rtmp,
        Access.CONTROL,
        docs.STOP_RTMP,
        session_owned=True,
    ),
    # Knowledge bases: documents the avatar answers from (the talk page's upload, OPEA's data prep).
    Route("POST", "/api/knowledge/{base}/documents", knowledge.upload, Access.CONTROL, docs.KNOWLEDGE_UPLOAD),
    Route("POST", "/v1/dataprep/ingest", knowledge.dataprep_ingest, Access.CONTROL, docs.DATAPREP_INGEST),
    Route("POST", "/v1/dataprep/get", knowledge.dataprep_get, Access.CONTROL, docs.DATAPREP_GET),
    Route("POST", "/v1/dataprep/delete", knowledge.dataprep_delete, Access.CONTROL, docs.DATAPREP_DELETE),
    # Watching a broadcast.
    Route("POST", "/whep", whep.offer, Access.CLIENT, docs.WHEP_OFFER, session_owned=True),
    Route("POST", "/whep/{session_id}", whep.offer, Access.CLIENT, docs.WHEP_OFFER, session_owned=True),
    Route("DELETE", "/whep/{session_id}/{viewer_id}", whep.stop, Access.CLIENT, docs.WHEP_STOP, session_owned=True),
    # The OpenAI-compatible model API.
    Route("GET", "/v1/models", openai_api.models, Access.CONTROL, docs.MODELS),
    Route("POST", "/v1/chat/completions", openai_api.chat_completions, Access.CONTROL, docs.CHAT_COMPLETIONS),
    Route(
        "POST", "/v1/audio/transcriptions", openai_api.transcriptions, Access.CONTROL, docs.TRANSCRIPTIONS, uploads=True
    ),
    Route("POST", "/v1/audio/speech", openai_api.speech, Access.CONTROL, docs.SPEECH),
    # The OPEA-compatible model API.
    Route("POST", "/v1/asr", opea.asr, Access.CONTROL, docs.ASR, uploads=True),
    Route("POST", "/v1/tts", opea.tts, Access.CONTROL, docs.TTS),
    Route("POST", "/v1/animation", opea.animation, Access.CONTROL, docs.ANIMATION, uploads=True),
    Route("POST", "/v1/wav2lip", opea.wav2lip, Access.CONTROL, docs.WAV2LIP, uploads=True),
    Route("POST", "/v1/avatarchatbot", opea.avatarchatbot, Access.CONTROL, docs.AVATARCHATBOT, uploads=True),
    Route("POST", "/v1/audioqna", opea.audioqna, Access.CONTROL, docs.AUDIOQNA, uploads=True),
    Route("GET", "/outputs/{name}", opea.output, Access.CONTROL, docs.OUTPUT),
    Route("GET", "/v1/health_check", opea.health_check, Access.PAGE, docs.HEALTH_CHECK),
    Route("GET", "/health", opea.health, Access.PAGE, docs.HEALTH),
    # The cluster: its processes (an operator's view: addresses and load), and render jobs.
    Route("GET", "/api/cluster", cluster.cluster_view, Access.CONTROL, docs.CLUSTER_VIEW),
    Route("GET", "/api/jobs/{job_id}", cluster.job_status, Access.CONTROL, docs.JOB_STATUS),
    Route("GET", "/api/jobs/{job_id}/video.mp4", cluster.job_video, Access.CONTROL, docs.JOB_VIDEO),
    # About the server.
    Route("GET", "/api/options", info.options, Access.CLIENT, docs.OPTIONS),
    Route("GET", "/api/avatars/{name}/mask.png", info.avatar_mask, Access.CLIENT, docs.AVATAR_MASK),
    Route("GET", "/healthz", info.healthz, Access.PAGE, docs.HEALTHZ),
    Route("GET", "/metrics", info.metrics, Access.PAGE, docs.METRICS),
    Route("GET", "/openapi.json", openapi_json, Access.PAGE, docs.OPENAPI),
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


def with_body_limit(handler: Handler, limit: int) -> Handler:
    """``handler`` reading bodies of up to ``limit`` bytes (api.max_body_bytes)."""

    async def limited(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request.clone(client_max_size=limit))
        except web.HTTPRequestEntityTooLarge:
            message = f"request body over the limit of {limit} bytes (api.max_body_bytes)"
            raise ApiError(413, "too_large", message) from None

    return limited


def _join_cluster(app: web.Application, runtime: Runtime, sessions: SessionRegistry) -> Runtime:
    """Make this server a node of the configured cluster; the runtime its sessions open with."""
    from media_server.cluster.node import ClusterNode  # imports NATS: only for a cluster

    app[CLUSTER] = node = ClusterNode(runtime, sessions)
    app.on_startup.append(lambda app: node.start())
    app.on_cleanup.append(lambda app: node.stop())
    return node.runtime


def _forwarded(app: web.Application, request: web.Request) -> bool:
    """Whether ``request`` was forwarded by another node of the cluster, which checked its client's access."""
    node = app.get(CLUSTER)
    return node is not None and node.replayer.trusts(request)


def create_app(runtime: Runtime) -> web.Application:
    server = runtime.settings.server
    access: dict[AbstractRoute, Access] = {}
    owned = {route.path for route in ROUTES if route.session_owned}
    # errors_as_json twice: inside, so the access layer can add CORS headers to every error a handler
    # gives; outside, for the access layer's own refusals.
    middlewares = [
        errors_as_json,
        access_middleware(
            server, lambda route: access.get(route, Access.PAGE), lambda request: _forwarded(app, request)
        ),
        errors_as_json,
        cluster.to_session_owner(owned),
    ]
    app = web.Application(client_max_size=server.max_body_bytes, middlewares=middlewares)
    app[METRICS] = metrics = ServerMetrics()
    app[SESSIONS] = sessions = SessionRegistry(server.max_sessions, metrics)
    if runtime.settings.cluster.url is not None:
        runtime = _join_cluster(app, runtime, sessions)
    app[RUNTIME] = runtime
    app[OFFER_LIMITER] = OfferLimiter(server.offers_per_minute)
    app[ON_DEMAND_START] = asyncio.Lock()
    app[AVATAR_MASKS] = {}
    app[SERVICE] = ModelService(runtime, jobs=app.get(CLUSTER))
    app[ROUTE_TABLE] = ROUTES
    for route in ROUTES:
        handler = route.handler
        if route.uploads:
            handler = with_body_limit(handler, runtime.settings.api.max_body_bytes)
        access[app.router.add_route(route.method, route.path, handler)] = route.access
    for path, page in PAGES.items():
        app.router.add_get(path, _page(page))
    app.router.add_get("/static/{path:.+}", static_file)
    app.on_startup.append(broadcasts.start_configured_broadcast)
    app.on_shutdown.append(lambda app: app[SESSIONS].close_all())
    return app

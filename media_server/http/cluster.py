"""The cluster over HTTP: session APIs carried to the node that owns the session, the cluster's view,
and render jobs. Used only when ``[cluster] url`` is set (``app[CLUSTER]``); without it the middleware
passes every request through, and nothing here imports NATS."""

from __future__ import annotations

import re

from aiohttp import web

from media_server.cluster.shared import AllNodesFull, ClusterUnavailable, ForwardTimeout
from media_server.http.errors import ApiError, Handler, busy
from media_server.http.limits import client_address
from media_server.http.state import CLUSTER, RUNTIME, SESSIONS
from media_server.sessions.base import ConversationMemory

JOB_ID = re.compile(r"[0-9a-f]{32}")


def unavailable(error: ClusterUnavailable) -> ApiError:
    return ApiError(503, "cluster_unavailable", f"{error}; try again shortly", {"Retry-After": "5"})


def node_timeout(error: ForwardTimeout) -> ApiError:
    return ApiError(504, "node_timeout", f"the node that owns the session did not answer: {error}")


def owned_session_id(request: web.Request) -> str:
    """The session a session-owned route is about: its path's, or the default broadcast (``POST /whep``)."""
    return request.match_info.get("session_id") or request.app[RUNTIME].settings.broadcast.default_id


async def placed_elsewhere(request: web.Request) -> web.Response | None:
    """In a cluster, the answer of the node that a new session (the offer or broadcast in ``request``) is
    placed on; None when it opens here. 503 when every node is full."""
    node = request.app.get(CLUSTER)
    if node is None:
        return None
    try:
        return await node.place(request, client_address(request))
    except AllNodesFull as error:
        raise busy("server_full", str(error)) from None
    except ForwardTimeout:
        return None  # the chosen node is too slow to answer: this one takes the session if it can


async def conversation_memory(app: web.Application, conversation_id: str) -> ConversationMemory:
    """A talk session's conversation; in a cluster, with the history an earlier session of it left."""
    node = app.get(CLUSTER)
    if node is None:
        return ConversationMemory(conversation_id)
    history = await node.conversations.load(conversation_id)
    return ConversationMemory(
        conversation_id, tuple(history), lambda changed: node.conversations.save_soon(conversation_id, changed)
    )


def to_session_owner(owned: set[str]) -> Handler:
    """Middleware: a request on one of the ``owned`` routes (by path pattern) about a session another node owns
    is answered by that node. Sessions here, and sessions nobody owns, are served here."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        node = request.app.get(CLUSTER)
        route = request.match_info.route.resource
        if node is None or route is None or route.canonical not in owned or node.replayer.trusts(request):
            return await handler(request)
        session_id, sessions = owned_session_id(request), request.app[SESSIONS]
        if session_id in sessions.talks or session_id in sessions.broadcasts:
            return await handler(request)
        timeout = request.app[RUNTIME].settings.broadcast.reply_timeout_s + node.link.settings.request_timeout_s
        try:
            answer = await node.forward_to_owner(session_id, request, client_address(request), timeout)
        except ForwardTimeout as error:
            raise node_timeout(error) from None
        return answer if answer is not None else await handler(request)

    return middleware  # type: ignore[return-value]


async def cluster_view(request: web.Request) -> web.Response:
    node = request.app.get(CLUSTER)
    if node is None:
        raise ApiError(404, "no_cluster", "this server is not part of a cluster (set cluster.url or --cluster)")
    return web.json_response(
        {
            "cluster": node.link.settings.name,
            "connected": node.link.connected,
            "here": node.link.node_id,
            "nodes": [entry.public() for entry in node.nodes()],
        }
    )


def _job_id(request: web.Request) -> str:
    if request.app.get(CLUSTER) is None:
        raise ApiError(404, "no_cluster", "render jobs need a cluster (set cluster.url or --cluster)")
    job_id = request.match_info["job_id"]
    if not JOB_ID.fullmatch(job_id):
        raise ApiError(404, "no_job", "no such render job")
    return job_id


async def job_status(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    try:
        status = await request.app[CLUSTER].job_status(job_id)
    except ClusterUnavailable as error:
        raise unavailable(error) from None
    if status is None:
        raise ApiError(404, "no_job", "no such render job (finished jobs are kept for cluster.job_retention_s)")
    described: dict[str, object] = {**status.__dict__}
    if status.state == "done":
        described["video_url"] = f"/api/jobs/{job_id}/video.mp4"
    return web.json_response(described)


async def job_video(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    try:
        video = await request.app[CLUSTER].job_video(job_id)
    except ClusterUnavailable as error:
        raise unavailable(error) from None
    if video is None:
        raise ApiError(404, "no_video", "this job has no video (yet): see GET /api/jobs/{id} for its state")
    return web.Response(body=video, content_type="video/mp4")

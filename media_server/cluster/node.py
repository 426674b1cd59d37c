"""A media node in a cluster: it publishes its load, reads everyone else's, places new sessions, carries
requests to the node that owns a session, and keeps talk sessions' histories in the cluster.

While the broker is away none of this is needed to serve: sessions are placed here, session APIs
reach the sessions here, lip-sync renders here, and everything picks up again once it reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web
from nats.aio.subscription import Subscription

from engines.base import LipSyncEngine
from engines.registry import create_engine
from media_server.cluster import jobs
from media_server.cluster.avatars import SharedAvatars
from media_server.cluster.conversations import ConversationStore
from media_server.cluster.forwarding import Replayer, forward
from media_server.cluster.link import ClusterLink
from media_server.cluster.lipsync import RemoteLipSync
from media_server.cluster.placement import choose_node
from media_server.cluster.registry import ClusterView, Heartbeat, NodeInfo, cpu_load
from media_server.cluster.shared import PLACED_HEADER, AllNodesFull, ClusterUnavailable
from media_server.runtime import Runtime
from media_server.sessions.base import MediaSession
from media_server.sessions.registry import SessionRegistry

log = logging.getLogger(__name__)
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def own_base_url(runtime: Runtime) -> str:
    """Where this process's HTTP server answers itself (forwarded requests are served through it)."""
    server = runtime.settings.server
    scheme = "https" if server.tls_cert else "http"
    host = "127.0.0.1" if server.host in WILDCARD_HOSTS else server.host
    return f"{scheme}://{host}:{server.port}"


def _fallback_lipsync(runtime: Runtime) -> LipSyncEngine:
    """The weight-free engine that renders idle frames, and speech when no worker is in time."""
    if runtime.settings.lipsync.engine == "warp":
        return runtime.engines.lipsync
    engine = create_engine("lipsync", "warp", {})
    assert isinstance(engine, LipSyncEngine)
    return engine


class ClusterNode:
    def __init__(self, runtime: Runtime, sessions: SessionRegistry) -> None:
        settings = runtime.settings
        self.link = ClusterLink(settings.cluster, role="node")
        self.view = ClusterView(self.link)
        self.sessions = sessions
        self.public_url = settings.cluster.public_url or f"http://{settings.server.host}:{settings.server.port}"
        self.replayer = Replayer(self.link, own_base_url(runtime))
        self.conversations = ConversationStore(self.link, settings.memory.max_history_messages)
        self.avatars = SharedAvatars(self.link, runtime.avatars)
        self.remote_lipsync: RemoteLipSync | None = None
        if settings.cluster.lipsync == "remote":
            self.remote_lipsync = RemoteLipSync(self.link, _fallback_lipsync(runtime), settings.cluster)
            descriptions = {**runtime.engines.descriptions, "lipsync": self.remote_lipsync.describe()}
            engines = dataclasses.replace(runtime.engines, lipsync=self.remote_lipsync, descriptions=descriptions)
            runtime = dataclasses.replace(runtime, engines=engines)
        self.runtime = runtime  # what sessions are opened with (the remote lip-sync engine, if configured)
        self.heartbeat = Heartbeat(self.link, self.here)
        self._session_subscriptions: dict[str, Subscription] = {}
        self._node_subscription: Subscription | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        sessions.listeners.append(self._on_session)
        self.link.on_connected(self._subscribe_all)

    # --- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.link.start()
        self.heartbeat.start()

    async def stop(self) -> None:
        await self.heartbeat.stop()
        await self.replayer.close()
        await self.link.close()

    def here(self) -> NodeInfo:
        engines = self.runtime.engines.descriptions
        stats = self.remote_lipsync.stats() if self.remote_lipsync else {}
        return NodeInfo(
            id=self.link.node_id,
            role="node",
            url=self.public_url,
            sessions=self.sessions.open_sessions,
            capacity=self.sessions.capacity,
            avatars=self.runtime.avatars.names(),
            engines={stage: str(description["engine"]) for stage, description in engines.items()},
            stats=stats,
            cpu_load=cpu_load(),
            at=time.time(),
        )

    def nodes(self) -> list[NodeInfo]:
        """Every process in the cluster, this one as it is now."""
        others = [entry for entry in self.view.entries() if entry.id != self.link.node_id]
        return [self.here(), *others]

    def avatar_names(self) -> list[str]:
        """Avatars this node has or can fetch: its own, and those any process of the cluster has."""
        return sorted({name for entry in self.nodes() for name in entry.avatars})

    # --- placement and forwarding ---------------------------------------------------------------

    async def place(self, request: web.Request, client: str) -> web.Response | None:
        """Open the session on the best node: None when that is this one (open it here), else that node's
        answer. AllNodesFull when no node has room."""
        if request.headers.get(PLACED_HEADER) and self.replayer.trusts(request):
            return None
        here = self.here()
        target = choose_node(here, self.view.media_nodes()) if self.link.connected else here
        if target is None:
            raise AllNodesFull(f"all {len(self.view.media_nodes()) or 1} nodes' sessions are in use; try again shortly")
        if target.id == here.id:
            return None
        subject = self.link.subject("node", target.id, "http")
        answer = await forward(self.link, subject, request, client, self.link.settings.request_timeout_s)
        if answer is None:  # it stopped since its last heartbeat
            log.info("cluster: node %s has gone; opening the session here", target.id)
        return answer

    async def forward_to_owner(
        self, session_id: str, request: web.Request, client: str, timeout_s: float
    ) -> web.Response | None:
        """The owning node's answer to a request about ``session_id``; None when no node owns it (or the
        broker is away): it is then served here."""
        if not self.link.connected:
            return None
        return await forward(self.link, self._session_subject(session_id), request, client, timeout_s)

    def _session_subject(self, session_id: str) -> str:
        return self.link.subject("session", session_id, "http")

    # --- subscriptions --------------------------------------------------------------------------

    def _on_session(self, session: MediaSession, opened: bool) -> None:
        if opened:
            self._run_soon(self._subscribe_session(session.id))
        elif (subscription := self._session_subscriptions.pop(session.id, None)) is not None:
            self._run_soon(self._unsubscribe(subscription))

    def _run_soon(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)  # referenced until done
        task.add_done_callback(self._tasks.discard)

    async def _subscribe_session(self, session_id: str) -> None:
        if session_id in self._session_subscriptions or not self.link.connected:
            return  # subscribed on (re)connection
        if not (session_id in self.sessions.talks or session_id in self.sessions.broadcasts):
            return  # closed meanwhile
        subscription = await self.link.client().subscribe(self._session_subject(session_id), cb=self.replayer.on_session)
        self._session_subscriptions[session_id] = subscription

    async def _unsubscribe(self, subscription: Subscription) -> None:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()

    async def _subscribe_all(self) -> None:
        if self._node_subscription is None:
            subject = self.link.subject("node", self.link.node_id, "http")
            self._node_subscription = await self.link.client().subscribe(subject, cb=self.replayer.on_placed)
        for session_id in [*self.sessions.talks, *self.sessions.broadcasts]:
            await self._subscribe_session(session_id)
        await self.heartbeat.publish()  # at once: the others place sessions here from now on

    # --- render jobs ----------------------------------------------------------------------------

    async def submit_render(self, audio: bytes, avatar: str) -> str:
        """Queue an MP4 of ``avatar`` speaking ``audio`` for any worker; the job id (ClusterUnavailable while
        the broker is away). For the model APIs and ``facecast render --cluster``."""
        return await jobs.submit_render(self.link, audio, avatar)

    async def render_result(self, job_id: str, timeout_s: float) -> tuple[jobs.JobStatus, bytes | None]:
        """The finished job's status and, when done, its MP4."""
        status = await jobs.wait_for_job(self.link, job_id, timeout_s)
        return status, await jobs.job_video(self.link, job_id) if status.state == "done" else None

    async def render_mp4(self, audio: bytes, avatar: str, timeout_s: float) -> tuple[str, bytes] | None:
        """A render done by a worker, for the model APIs (service.RenderJobs): its job id and MP4; None while
        the broker is away (the caller renders it itself); RuntimeError with the job's error when it failed."""
        try:
            job_id = await self.submit_render(audio, avatar)
        except ClusterUnavailable:
            return None
        status, video = await self.render_result(job_id, timeout_s)
        if video is None:
            raise RuntimeError(f"render job {status.id} {status.state}: {status.error or 'no video'}")
        return job_id, video

    async def job_status(self, job_id: str) -> jobs.JobStatus | None:
        return await jobs.job_status(self.link, job_id)

    async def job_video(self, job_id: str) -> bytes | None:
        return await jobs.job_video(self.link, job_id)

"""The connection to NATS that every cluster feature goes through.

It connects in the background and keeps reconnecting by itself, so a process starts (and goes on
serving its own sessions) while the broker is away; ``connected`` says whether it is there now, and
every caller asks before it sends, so nothing waits on a broker that is down. Subjects and bucket
names are namespaced by ``cluster.name``, so two clusters can share one broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from media_server.cluster.shared import ClusterUnavailable
from media_server.config import ClusterSettings

log = logging.getLogger(__name__)
RECONNECT_WAIT_S = 0.5
CONNECT_TIMEOUT_S = 2
PING_INTERVAL_S = 2  # a broker that vanished without closing the connection is noticed within a few pings
JOBS_STREAM = "jobs"


@dataclass(frozen=True)
class BucketSpec:
    kind: str
    ttl_s: float | None
    memory: bool = False
    max_value_bytes: int | None = None


def redacted(url: str) -> str:
    """``url`` without the user and password it may hold, for logs and reports."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def default_node_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def _tls_context(settings: ClusterSettings) -> ssl.SSLContext | None:
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    context = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
    if settings.tls_cert is not None and settings.tls_key is not None:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def connect_options(settings: ClusterSettings, environ: Mapping[str, str] = os.environ) -> dict[str, object]:
    """nats.connect's credentials and TLS: the config's, else the environment's (NATS_TOKEN, NATS_USER and
    NATS_PASSWORD, NATS_CREDS)."""
    options: dict[str, object] = {}
    token = settings.token or environ.get("NATS_TOKEN")
    user, password = settings.user or environ.get("NATS_USER"), settings.password or environ.get("NATS_PASSWORD")
    credentials = settings.credentials_file or environ.get("NATS_CREDS")
    if token:
        options["token"] = token
    if user and password:
        options.update(user=user, password=password)
    if credentials:
        options["user_credentials"] = str(credentials)
    tls = _tls_context(settings)
    if tls is not None:
        options["tls"] = tls
    return options


class ClusterLink:
    def __init__(self, settings: ClusterSettings, role: str) -> None:
        if settings.url is None:
            raise ValueError("a cluster link needs cluster.url")
        self.settings = settings
        self.url = settings.url
        self.role = role
        self.node_id = settings.node_id or default_node_id(role)
        self.prefix = f"facecast.{settings.name}"
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: dict[str, KeyValue] = {}
        self._objects: dict[str, ObjectStore] = {}
        self._on_connected: list[Callable[[], Awaitable[None]]] = []
        self._connecting: asyncio.Task[None] | None = None
        self._closing = False
        self.loop: asyncio.AbstractEventLoop | None = None

    # --- the connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def on_connected(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` on every (re)connection: subscriptions survive by themselves, state may not."""
        self._on_connected.append(callback)

    async def start(self) -> None:
        """Connect in the background, retrying until the broker answers."""
        self.loop = asyncio.get_running_loop()
        self._connecting = asyncio.create_task(self._connect_until_done(), name="cluster connect")

    async def wait_connected(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.connected and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.connected

    async def _connect_until_done(self) -> None:
        options = connect_options(self.settings)
        while True:
            try:
                self.nc = await nats.connect(
                    self.url,
                    name=f"facecast {self.role} {self.node_id}",
                    connect_timeout=CONNECT_TIMEOUT_S,
                    reconnect_time_wait=RECONNECT_WAIT_S,
                    max_reconnect_attempts=-1,
                    ping_interval=PING_INTERVAL_S,
                    max_outstanding_pings=2,
                    allow_reconnect=True,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    error_cb=self._error,
                    **options,  # type: ignore[arg-type]
                )
                break
            except Exception as error:  # noqa: BLE001 - any failure to connect: try again
                log.warning("cluster: cannot reach NATS at %s (%s); retrying", redacted(self.url), error)
                await asyncio.sleep(RECONNECT_WAIT_S * 2)
        log.info("cluster: connected to NATS at %s as %s", redacted(self.url), self.node_id)
        self._js = self.nc.jetstream()
        await self._reconnected()

    async def _disconnected(self) -> None:
        if self._closing:
            return
        log.warning("cluster: lost NATS at %s; serving locally until it is back", redacted(self.url))

    async def _reconnected(self) -> None:
        # A broker that restarted without its storage has lost the buckets: look them up afresh.
        self._kv.clear()
        self._objects.clear()
        for callback in self._on_connected:
            try:
                await callback()
            except Exception as error:  # noqa: BLE001 - the next reconnection tries again
                log.warning("cluster: setting up after connecting failed: %s", error)

    async def _error(self, error: Exception) -> None:
        log.debug("cluster: NATS: %s", error)

    async def close(self) -> None:
        self._closing = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    def client(self) -> Client:
        """The connection, or ClusterUnavailable while the broker is away."""
        if self.nc is None or not self.nc.is_connected:
            raise ClusterUnavailable(f"NATS at {redacted(self.url)} is not reachable")
        return self.nc

    def jetstream(self) -> JetStreamContext:
        self.client()
        assert self._js is not None
        return self._js

    # --- names ----------------------------------------------------------------------------------

    def subject(self, *parts: str) -> str:
        return ".".join((self.prefix, *parts))

    def bucket_name(self, kind: str) -> str:
        return f"facecast_{self.settings.name}_{kind}"

    # --- JetStream ------------------------------------------------------------------------------

    async def kv(self, spec: BucketSpec) -> KeyValue:
        """The key-value bucket ``spec`` names, created on first use."""
        if spec.kind not in self._kv:
            js, name = self.jetstream(), self.bucket_name(spec.kind)
            try:
                bucket = await js.key_value(name)
            except (BucketNotFoundError, NotFoundError):
                config = KeyValueConfig(
                    bucket=name,
                    ttl=spec.ttl_s,
                    storage=StorageType.MEMORY if spec.memory else StorageType.FILE,
                    max_value_size=spec.max_value_bytes,
                )
                bucket = await js.create_key_value(config)
            self._kv[spec.kind] = bucket
        return self._kv[spec.kind]

    async def object_store(self, kind: str, ttl_s: float | None = None) -> ObjectStore:
        if kind not in self._objects:
            js, name = self.jetstream(), self.bucket_name(kind)
            try:
                store = await js.object_store(name)
            except (BucketNotFoundError, NotFoundError):
                store = await js.create_object_store(name, ObjectStoreConfig(bucket=name, ttl=ttl_s))
            self._objects[kind] = store
        return self._objects[kind]

    def forget_buckets(self) -> None:
        """After a JetStream call failed: the bucket may be gone (a broker restarted without its storage)."""
        self._kv.clear()
        self._objects.clear()

    async def ensure_jobs_stream(self) -> str:
        """The work-queue stream render jobs wait on (each job is delivered to one worker, removed once done)."""
        js, name = self.jetstream(), self.bucket_name(JOBS_STREAM)
        try:
            await js.stream_info(name)
        except NotFoundError:
            config = StreamConfig(
                name=name,
                subjects=[self.subject("jobs", ">")],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
            await js.add_stream(config)
        return name

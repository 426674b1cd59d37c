"""Who is in the cluster and how busy: every process (media node or worker) publishes an entry to a
key-value bucket every ``cluster.heartbeat_s``; the bucket forgets entries after ``registry_ttl_s``.

Readers do not poll the bucket: each put is a message on the bucket's subject, so a ``ClusterView``
subscribes to it and knows of every change at once, and a process that stopped publishing ages out
of the view after the same TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NoKeysError

from media_server.cluster.link import BucketSpec, ClusterLink
from media_server.cluster.shared import ClusterUnavailable

log = logging.getLogger(__name__)
KV_OPERATION = "KV-Operation"


@dataclass(frozen=True)
class NodeInfo:
    id: str
    role: str  # "node" (serves sessions) or "worker" (lip-sync and render jobs)
    url: str | None  # where clients reach a node; None for a worker
    sessions: int
    capacity: int
    avatars: list[str]
    engines: dict[str, str]
    stats: dict[str, int] = field(default_factory=dict)  # counters of what it did (frames, leases, jobs)
    cpu_load: float = 0.0  # the machine's 1-minute load average per core
    at: float = 0.0  # time.time() when published

    @property
    def load(self) -> float:
        return self.sessions / self.capacity if self.capacity else 1.0

    @property
    def has_room(self) -> bool:
        return self.sessions < self.capacity

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "load": round(self.load, 3)}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NodeInfo:
        fields = json.loads(data)
        fields.pop("load", None)
        return cls(**fields)

    def public(self) -> dict[str, object]:
        """What GET /api/cluster shows of it."""
        return {**asdict(self), "load": round(self.load, 3), "age_s": round(max(0.0, time.time() - self.at), 2)}


def cpu_load() -> float:
    return round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)


def registry_bucket(link: ClusterLink) -> BucketSpec:
    return BucketSpec("registry", ttl_s=link.settings.registry_ttl_s, memory=True)


class Heartbeat:
    """Publishes this process's entry every ``heartbeat_s`` while the broker is there; silent while it is not."""

    def __init__(self, link: ClusterLink, describe: Callable[[], NodeInfo]) -> None:
        self.link = link
        self.describe = describe
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster heartbeat")

    async def publish(self) -> None:
        entry = self.describe()
        bucket = await self.link.kv(registry_bucket(self.link))
        await bucket.put(entry.id, entry.to_json())

    async def _run(self) -> None:
        while True:
            if self.link.connected:
                try:
                    await self.publish()
                except ClusterUnavailable:
                    pass
                except Exception as error:  # noqa: BLE001 - the broker's bad moment: next beat tries again
                    log.debug("cluster: heartbeat failed: %s", error)
                    self.link.forget_buckets()
            await asyncio.sleep(self.link.settings.heartbeat_s)

    async def stop(self) -> None:
        """Stop publishing and remove the entry, so the others stop counting on this process at once."""
        if self._task is not None:
            self._task.cancel()
        if self.link.connected:
            with contextlib.suppress(Exception):
                bucket = await self.link.kv(registry_bucket(self.link))
                await bucket.delete(self.link.node_id)


class ClusterView:
    """Every process's latest entry, as heard within ``registry_ttl_s``."""

    def __init__(self, link: ClusterLink) -> None:
        self.link = link
        self._entries: dict[str, tuple[NodeInfo, float]] = {}
        self._subscription: Subscription | None = None
        link.on_connected(self._refresh)

    async def _refresh(self) -> None:
        """On every (re)connection: subscribe once, then read what the bucket holds now."""
        spec = registry_bucket(self.link)
        bucket = await self.link.kv(spec)
        if self._subscription is None:
            subject = f"$KV.{self.link.bucket_name(spec.kind)}.>"
            self._subscription = await self.link.client().subscribe(subject, cb=self._on_put)
        try:
            keys = await bucket.keys()
        except NoKeysError:
            return
        for key in keys:
            with contextlib.suppress(Exception):
                entry = await bucket.get(key)
                if entry.value:
                    self._remember(NodeInfo.from_json(entry.value))

    async def _on_put(self, message: Msg) -> None:
        key = message.subject.rsplit(".", 1)[-1]
        if message.headers and message.headers.get(KV_OPERATION) in ("DEL", "PURGE"):
            self._entries.pop(key, None)
            return
        try:
            self._remember(NodeInfo.from_json(message.data))
        except (ValueError, TypeError) as error:
            log.warning("cluster: ignored a registry entry that is not one (%s)", error)

    def _remember(self, info: NodeInfo) -> None:
        self._entries[info.id] = (info, time.monotonic())

    def entries(self) -> list[NodeInfo]:
        """The processes heard from within the TTL (none while the broker is away for longer)."""
        horizon = time.monotonic() - self.link.settings.registry_ttl_s
        for stale in [key for key, (_, heard) in self._entries.items() if heard < horizon]:
            del self._entries[stale]
        return [info for info, _ in self._entries.values()]

    def media_nodes(self) -> list[NodeInfo]:
        return [info for info in self.entries() if info.role == "node"]

    async def settle(self, seconds: float) -> list[NodeInfo]:
        """The entries heard after listening for ``seconds`` (a heartbeat or two: for a one-off look)."""
        await asyncio.sleep(seconds)
        return self.entries()

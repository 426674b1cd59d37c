"""The worker's side of remote lip-sync: leases, and the chunks of speech rendered under them.

A worker with room listens on the lease subject in the workers' queue group, so a lease request goes
to one worker that has room; once it has ``cluster.worker_sessions`` leases it leaves the group (and
refuses any request already on its way) until one ends. Each lease is one lip-sync stream of the
worker's engine, fed chunk by chunk on the worker's own subject, in order; a lease left unused for
``lipsync_lease_idle_s`` (its node died) is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from engines.avatar import Avatar, AvatarError
from engines.base import LipSyncEngine, LipSyncStream
from media_server.cluster.avatars import SharedAvatars
from media_server.cluster.link import ClusterLink
from media_server.cluster.lipsync import LEASE_QUEUE, encode_frames, lease_subject, worker_subject

log = logging.getLogger(__name__)
SWEEP_PERIOD_S = 1.0


@dataclass
class _Leased:
    stream: LipSyncStream
    used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: a lease's chunks render in arrival order


class LipSyncService:
    def __init__(self, link: ClusterLink, engine: LipSyncEngine, avatars: SharedAvatars) -> None:
        self.link = link
        self.engine = engine
        self.avatars = avatars
        self.capacity = link.settings.worker_sessions
        self.leases: dict[str, _Leased] = {}
        self.stats = {"leases": 0, "chunks": 0, "frames": 0, "refused": 0}
        self._queue: Subscription | None = None
        self._own: Subscription | None = None
        self._preparing: set[str] = set()
        self._prepared: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        link.on_connected(self._subscribe)

    async def _subscribe(self) -> None:
        if self._own is None:
            self._own = await self.link.client().subscribe(worker_subject(self.link, self.link.node_id), cb=self._on_own)
        await self._update_queue_membership()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="lease sweeper")

    @property
    def accepting(self) -> bool:
        """Whether it is in the lease queue now (it has room, and the broker is there)."""
        return self._queue is not None and self.link.connected

    async def _update_queue_membership(self) -> None:
        """In the queue group while there is room, out of it while full."""
        full = len(self.leases) >= self.capacity
        if full and self._queue is not None:
            queue, self._queue = self._queue, None
            await queue.unsubscribe()
        elif not full and self._queue is None and self.link.connected:
            self._queue = await self.link.client().subscribe(lease_subject(self.link), queue=LEASE_QUEUE, cb=self._on_lease)

    # --- leases ---------------------------------------------------------------------------------

    async def _on_lease(self, message: Msg) -> None:
        try:
            asked = json.loads(message.data)
        except ValueError:
            asked = {}
        answer = await self._lease(asked if isinstance(asked, dict) else {})
        await message.respond(json.dumps(answer).encode())

    async def _lease(self, asked: dict[str, object]) -> dict[str, object]:
        if len(self.leases) >= self.capacity:
            self.stats["refused"] += 1
            return {"refused": f"worker {self.link.node_id} is rendering {self.capacity} sessions, its limit"}
        name = str(asked.get("avatar"))
        avatar = self._ready_avatar(name)
        if avatar is None:
            self._prepare_soon(name)
            return {"refused": f"worker {self.link.node_id} is preparing avatar {name!r}"}
        try:
            stream = self.engine.open_stream(avatar, int(asked["fps"]), int(asked["sample_rate"]))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as error:
            return {"refused": f"bad lease request: {error}"}
        lease_id = uuid.uuid4().hex
        self.leases[lease_id] = _Leased(stream)
        self.stats["leases"] += 1
        await self._update_queue_membership()
        return {"lease": lease_id, "subject": worker_subject(self.link, self.link.node_id), "worker": self.link.node_id}

    def _ready_avatar(self, name: str) -> Avatar | None:
        """The avatar if it is prepared; preparing may take long (Wav2Lip), so a session waiting for its
        lease never waits for it: it renders that turn itself."""
        return self.avatars.catalogue.get(name) if name in self._prepared else None

    def _prepare_soon(self, name: str) -> None:
        if name in self._preparing:
            return
        self._preparing.add(name)
        task = asyncio.create_task(self._prepare(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prepare(self, name: str) -> None:
        try:
            avatar = await self.avatars.get(name)
            await asyncio.to_thread(self.engine.prepare, avatar)
            self._prepared.add(name)
        except (AvatarError, KeyError) as error:
            log.warning("worker: avatar %r cannot be used: %s", name, error)
        finally:
            self._preparing.discard(name)

    async def prepare(self, names: list[str]) -> None:
        """Prepare these avatars before taking any lease (at start-up: the ones this worker has)."""
        for name in names:
            self._preparing.add(name)
            await self._prepare(name)

    async def _sweep(self) -> None:
        idle_s = self.link.settings.lipsync_lease_idle_s
        while True:
            await asyncio.sleep(SWEEP_PERIOD_S)
            horizon = time.monotonic() - idle_s
            for lease_id in [key for key, leased in self.leases.items() if leased.used < horizon and not leased.lock.locked()]:
                log.info("worker: lease %s unused for %g s: dropped", lease_id, idle_s)
                del self.leases[lease_id]
            await self._update_queue_membership()

    # --- chunks ---------------------------------------------------------------------------------

    async def _on_own(self, message: Msg) -> None:
        # One task per message (callbacks run one at a time): sessions render side by side.
        task = asyncio.create_task(self._serve(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, message: Msg) -> None:
        headers = message.headers or {}
        lease_id, op = headers.get("Lease", ""), headers.get("Op")
        leased = self.leases.get(lease_id)
        if op == "release":
            self.leases.pop(lease_id, None)
            await self._update_queue_membership()
            return
        if leased is None:
            await self._reply(message, b"", {"Error": f"no lease {lease_id[:40]!r} on worker {self.link.node_id}"})
            return
        async with leased.lock:
            leased.used = time.monotonic()
            audio = np.frombuffer(message.data, np.float32)
            started = time.perf_counter()
            try:
                data, sizes, segment_end = await asyncio.to_thread(_render_chunk, leased.stream, audio, headers.get("End") == "1")
            except Exception as error:  # noqa: BLE001 - the node renders it itself; this worker goes on
                log.exception("worker: rendering a chunk failed")
                await self._reply(message, b"", {"Error": f"the worker failed: {error}"})
                return
            self.stats["chunks"] += 1
            self.stats["frames"] += len(sizes)
        worker_ms = f"{(time.perf_counter() - started) * 1000:.2f}"
        headers = {"Sizes": ",".join(map(str, sizes)), "End": "1" if segment_end else "0", "Worker-Ms": worker_ms}
        await self._reply(message, data, headers)

    async def _reply(self, message: Msg, data: bytes, headers: dict[str, str]) -> None:
        if message.reply and self.link.connected:
            await self.link.client().publish(message.reply, data, headers=headers)

    async def close(self) -> None:
        for task in [*self._tasks, *([self._sweeper] if self._sweeper else [])]:
            task.cancel()


def _render_chunk(stream: LipSyncStream, audio: np.ndarray, end: bool) -> tuple[bytes, list[int], bool]:
    if audio.size:
        stream.push_audio(audio.copy())
    if end:
        stream.end_segment()
    frames = stream.pull()
    data, sizes = encode_frames([frame.video for frame in frames])
    return data, sizes, bool(frames) and frames[-1].segment_end

"""Lip-sync rendered on a worker, with the weight-free engine here whenever the worker is not in time.

``RemoteLipSync`` is a lip-sync engine like any other (engines/base.py), so ``AvatarOutput`` and the
contract tests use it unchanged. Each segment of speech (a turn) leases a worker: the lease request
goes to the workers' queue group, so the first worker with room answers. The stream then sends the
segment's audio, piece by piece as the output pushes it, by request-reply to that worker's own subject:
one chunk in flight per session (the output's lip-sync thread waits for its frames), which is the
back-pressure. The worker answers with the chunk's frames as JPEGs, in order; their audio never
travels back: frame k of a segment is shown with samples [k*spf, (k+1)*spf), which this side has.

If no worker takes the lease, or a chunk is not back within ``cluster.lipsync_chunk_deadline_s``
(the worker died, the broker is down), the rest of the segment is rendered here by the fallback
engine from the first frame not yet rendered, so the audio — the clock — never waits for a worker.
The next segment asks for a lease again. Idle frames are always rendered here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numpy as np

from engines.base import AVFrame, LipSyncEngine, LipSyncStream, PhonemeTiming, mono_samples
from media_server.cluster.link import ClusterLink
from media_server.config import ClusterSettings

if TYPE_CHECKING:
    from engines.avatar import Avatar

log = logging.getLogger(__name__)
T = TypeVar("T")
LEASE_QUEUE = "lipsync-workers"
BRIDGE_SLACK_S = 0.2  # beyond a request's own timeout, for the hop between threads
CONNECTION_CHECK_S = 0.01  # how often a waiting lip-sync thread checks that the broker is still there


class ChunkFailed(Exception):
    """A worker did not render a chunk (refused, failed, late, or gone)."""


@dataclass(frozen=True)
class Lease:
    id: str
    subject: str
    worker: str


def lease_subject(link: ClusterLink) -> str:
    return link.subject("lipsync", "lease")


def worker_subject(link: ClusterLink, worker_id: str) -> str:
    return link.subject("worker", worker_id, "lipsync")


@dataclass(frozen=True)
class RenderedChunk:
    jpegs: bytes
    sizes: list[int]
    segment_end: bool
    worker_ms: float  # the worker's own time on it (rendering and encoding), for `facecast bench cluster`


async def request_lease(link: ClusterLink, avatar: Avatar, fps: int, sample_rate: int, timeout_s: float) -> Lease:
    """A lease from the first worker with room; ChunkFailed when one refuses (NATS errors when none answers)."""
    asked = {"avatar": avatar.name, "source_hash": avatar.source_hash, "fps": fps, "sample_rate": sample_rate, "node": link.node_id}
    reply = await link.client().request(lease_subject(link), json.dumps(asked).encode(), timeout=timeout_s)
    answer = json.loads(reply.data)
    if "lease" not in answer:
        raise ChunkFailed(answer.get("refused", "the worker refused the lease"))
    return Lease(answer["lease"], answer["subject"], answer["worker"])


async def render_chunk(link: ClusterLink, lease: Lease, audio: np.ndarray, end: bool, timeout_s: float) -> RenderedChunk:
    """The frames the leased worker renders from the segment's next ``audio`` (and its end, if ``end``)."""
    headers = {"Lease": lease.id, "Op": "chunk", "End": "1" if end else "0"}
    reply = await link.client().request(lease.subject, audio.tobytes(), timeout=timeout_s, headers=headers)
    answer = reply.headers or {}
    if "Error" in answer:
        raise ChunkFailed(answer["Error"])
    sizes = [int(size) for size in answer.get("Sizes", "").split(",") if size]
    return RenderedChunk(reply.data, sizes, answer.get("End") == "1", float(answer.get("Worker-Ms", "0")))


async def release_lease(link: ClusterLink, lease: Lease) -> None:
    """Best effort: a worker also forgets a lease left unused for ``lipsync_lease_idle_s``."""
    if link.connected:
        await link.client().publish(lease.subject, b"", headers={"Lease": lease.id, "Op": "release"})


def encode_frames(pictures: list[np.ndarray], quality: int = 90) -> tuple[bytes, list[int]]:
    """JPEGs of ``pictures``, concatenated, and each one's size."""
    encoded = [cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes() for picture in pictures]
    return b"".join(encoded), [len(jpeg) for jpeg in encoded]


def decode_frames(data: bytes, sizes: list[int]) -> list[np.ndarray]:
    pictures, offset = [], 0
    for size in sizes:
        picture = cv2.imdecode(np.frombuffer(data[offset : offset + size], np.uint8), cv2.IMREAD_COLOR)
        if picture is None:
            raise ChunkFailed("a frame from the worker is not a JPEG")
        pictures.append(picture)
        offset += size
    return pictures


class RemoteLipSync(LipSyncEngine):
    """Renders speech on ``facecast worker`` processes; ``fallback`` renders idle frames, and speech when
    no worker is in time."""

    def __init__(self, link: ClusterLink, fallback: LipSyncEngine, settings: ClusterSettings) -> None:
        self.link = link
        self.fallback = fallback
        self.settings = settings
        self.frames_remote = 0
        self.frames_local = 0
        self.chunks_late = 0
        self._count_lock = threading.Lock()

    def warm_up(self) -> None:
        self.fallback.warm_up()

    def describe(self) -> dict[str, object]:
        return {"engine": "remote", "where": "leased `facecast worker` processes", "fallback": self.fallback.describe()}

    def prepare(self, avatar: Avatar) -> None:
        self.fallback.prepare(avatar)

    def open_stream(self, avatar: Avatar, fps: int, sample_rate: int) -> RemoteLipSyncStream:
        return RemoteLipSyncStream(self, avatar, self.fallback.open_stream(avatar, fps, sample_rate), fps, sample_rate)

    def count(self, remote: int = 0, local: int = 0, late: int = 0) -> None:
        with self._count_lock:
            self.frames_remote += remote
            self.frames_local += local
            self.chunks_late += late

    def stats(self) -> dict[str, int]:
        return {"frames_remote": self.frames_remote, "frames_local": self.frames_local, "chunks_late": self.chunks_late}

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``coroutine`` on the link's event loop from a lip-sync thread; ChunkFailed past ``timeout_s``,
        or as soon as the broker is lost (a request in flight then never gets its answer)."""
        loop = self.link.loop
        if loop is None or not self.link.connected:
            coroutine.close()
            raise ChunkFailed("the broker is not reachable")
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        deadline = time.monotonic() + timeout_s + BRIDGE_SLACK_S
        try:
            while True:
                try:
                    return future.result(CONNECTION_CHECK_S)
                except FutureTimeout:
                    if not self.link.connected or time.monotonic() > deadline:
                        future.cancel()
                        raise ChunkFailed(f"no answer within {timeout_s:g} s" if self.link.connected else "lost the broker") from None
        except ChunkFailed:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the broker or worker did: render here
            raise ChunkFailed(str(error) or type(error).__name__) from error


class RemoteLipSyncStream(LipSyncStream):
    def __init__(self, engine: RemoteLipSync, avatar: Avatar, local: LipSyncStream, fps: int, sample_rate: int) -> None:
        self.engine = engine
        self.link = engine.link
        self.avatar = avatar
        self.local = local
        self.fps = fps
        self.sample_rate = sample_rate
        self.spf = sample_rate // fps
        self._lease: Lease | None = None
        self._remote: bool | None = None  # None until the segment's first audio decides where it renders
        self._audio = np.zeros(0, np.float32)  # the segment's audio so far
        self._sent = 0  # samples of it sent to the worker
        self._frames_out = 0  # frames of the segment pulled so far
        self._ended = False
        self._end_sent = False

    # --- the contract ---------------------------------------------------------------------------

    def push_audio(self, audio: np.ndarray, phonemes: tuple[PhonemeTiming, ...] | None = None) -> None:
        samples = mono_samples(audio)
        if self._remote is None:
            self._remote = self._take_lease()
        self._audio = np.concatenate([self._audio, samples])
        if not self._remote:
            self.local.push_audio(samples, phonemes)

    def end_segment(self) -> None:
        if self._remote is None:  # a segment without speech: nothing to render anywhere
            self.local.end_segment()
            return
        self._ended = True
        if not self._remote:
            self.local.end_segment()

    def pull(self) -> list[AVFrame]:
        if self._remote:
            try:
                frames = self._pull_remote()
                self.engine.count(remote=len(frames))
                return self._advance(frames)
            except ChunkFailed as error:
                log.warning("lip-sync on worker %s failed (%s): rendering the rest of the turn here", self._worker(), error)
                self.engine.count(late=1)
                self._render_rest_here()
        frames = self.local.pull()
        self.engine.count(local=len(frames))
        return self._advance(frames)

    def idle_frame(self, elapsed_frames: int = 1) -> np.ndarray:
        return self.local.idle_frame(elapsed_frames)

    def clear(self) -> None:
        self.local.clear()
        self._release()  # the worker's stream goes with its lease: the next segment starts on a fresh one
        self._new_segment()

    # --- segments -------------------------------------------------------------------------------

    def _new_segment(self) -> None:
        self._remote = None
        self._audio = np.zeros(0, np.float32)
        self._sent = self._frames_out = 0
        self._ended = self._end_sent = False

    def _advance(self, frames: list[AVFrame]) -> list[AVFrame]:
        self._frames_out += len(frames)
        if frames and frames[-1].segment_end:
            self._release()
            self._new_segment()
        return frames

    def _worker(self) -> str:
        return self._lease.worker if self._lease else "-"

    def _render_rest_here(self) -> None:
        """The worker is gone or late: the fallback takes the segment from its first frame not rendered."""
        self._release()
        self._remote = False
        self.local.clear()
        rest = self._audio[self._frames_out * self.spf :]
        if rest.size:
            self.local.push_audio(rest)
        if self._ended:
            self.local.end_segment()

    # --- the worker -----------------------------------------------------------------------------

    def _take_lease(self) -> bool:
        timeout = self.engine.settings.lipsync_lease_timeout_s
        try:
            lease = request_lease(self.link, self.avatar, self.fps, self.sample_rate, timeout)
            self._lease = self.engine.call(lease, timeout)
        except ChunkFailed as error:
            log.debug("no lip-sync worker took the turn (%s): rendering it here", error)
            self._lease = None
        return self._lease is not None

    def _pull_remote(self) -> list[AVFrame]:
        pending = self._audio[self._sent :]
        send_end = self._ended and not self._end_sent
        if not pending.size and not send_end:
            return []
        deadline = self.engine.settings.lipsync_chunk_deadline_s
        assert self._lease is not None
        chunk = self.engine.call(render_chunk(self.link, self._lease, pending, send_end, deadline), deadline)
        pictures = decode_frames(chunk.jpegs, chunk.sizes)
        self._sent += len(pending)
        self._end_sent = send_end
        return self._frames_for(pictures, chunk.segment_end)

    def _frames_for(self, pictures: list[np.ndarray], segment_end: bool) -> list[AVFrame]:
        """The worker's pictures of frames ``_frames_out``... with this side's audio for each."""
        frames = []
        for index, picture in enumerate(pictures):
            start = (self._frames_out + index) * self.spf
            audio = self._audio[start : start + self.spf]
            if len(audio) < self.spf:
                if not (segment_end and index == len(pictures) - 1 and audio.size):
                    raise ChunkFailed("the worker sent more frames than the audio allows")
                audio = np.concatenate([audio, np.zeros(self.spf - len(audio), np.float32)])
            frames.append(AVFrame(picture, audio, segment_end=segment_end and index == len(pictures) - 1))
        return frames

    def _release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None and self.link.loop is not None:
            asyncio.run_coroutine_threadsafe(release_lease(self.link, lease), self.link.loop)


"""Durable render jobs: an MP4 of an avatar speaking a recording, rendered by whichever worker is free.

A job is a message on a work-queue stream (each delivered to one worker, removed once acknowledged); its
audio and, when done, its MP4 are objects in the media store, and its status is a key in the jobs
bucket, which any node reads (``GET /api/jobs/{id}``). A worker keeps telling the stream it is still
at it; a worker killed mid-job stops, and the job is delivered again, to another worker, after
``cluster.job_ack_wait_s``. Each delivery is an attempt: a job that fails, or loses its worker,
``cluster.job_attempts`` times ends ``failed`` with its last error. Nothing is dropped silently.

``submit_render`` and ``wait_for_job`` are what ``facecast render --cluster`` and the model APIs use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import KeyNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from media_server.cluster.avatars import SharedAvatars
from media_server.cluster.link import BucketSpec, ClusterLink

log = logging.getLogger(__name__)
MEDIA_STORE = "media"
CONSUMER = "render-workers"
FETCH_WAIT_S = 2.0
POLL_S = 0.2
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


@dataclass(frozen=True)
class JobStatus:
    id: str
    state: str  # queued, running, retrying, done, failed
    avatar: str
    attempts: int = 0
    error: str | None = None
    worker: str | None = None
    frames: int | None = None
    audio_seconds: float | None = None
    submitted: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobStatus:
        return cls(**json.loads(data))


@dataclass(frozen=True)
class RenderedVideo:
    frames: int
    audio_seconds: float


# Renders the audio file as an MP4 of the avatar (the worker's own engine): avatar name, audio, out.
RenderFunction = Callable[[str, Path, Path], RenderedVideo]


def jobs_bucket(link: ClusterLink) -> BucketSpec:
    return BucketSpec("jobs", ttl_s=link.settings.job_retention_s)


def audio_object(job_id: str) -> str:
    return f"jobs/{job_id}/audio"


def video_object(job_id: str) -> str:
    return f"jobs/{job_id}/video.mp4"


async def _media(link: ClusterLink) -> ObjectStore:
    return await link.object_store(MEDIA_STORE, ttl_s=link.settings.job_retention_s)


async def put_status(link: ClusterLink, status: JobStatus) -> None:
    bucket = await link.kv(jobs_bucket(link))
    await bucket.put(status.id, replace(status, updated=time.time()).to_json())


async def submit_render(link: ClusterLink, audio: bytes, avatar: str) -> str:
    """Queue a render of ``audio`` (any format FFmpeg reads) spoken by ``avatar``; its job id.
    ClusterUnavailable while the broker is away."""
    job_id = uuid.uuid4().hex
    media = await _media(link)
    await media.put(audio_object(job_id), audio)
    await put_status(link, JobStatus(job_id, "queued", avatar))
    stream = await link.ensure_jobs_stream()
    await link.jetstream().publish(link.subject("jobs", "render"), json.dumps({"id": job_id, "avatar": avatar}).encode(), stream=stream)
    return job_id


async def job_status(link: ClusterLink, job_id: str) -> JobStatus | None:
    bucket = await link.kv(jobs_bucket(link))
    try:
        entry = await bucket.get(job_id)
    except KeyNotFoundError:
        return None
    return JobStatus.from_json(entry.value or b"{}")


async def wait_for_job(link: ClusterLink, job_id: str, timeout_s: float) -> JobStatus:
    """The job's status once it is done or failed; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if link.connected:
            status = await job_status(link, job_id)
            if status is not None and status.finished:
                return status
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"render job {job_id} not finished within {timeout_s:g} s")


async def job_video(link: ClusterLink, job_id: str) -> bytes | None:
    media = await _media(link)
    try:
        return (await media.get(video_object(job_id))).data
    except (ObjectNotFoundError, NotFoundError):
        return None


class RenderJobs:
    """A worker's job loop: one job at a time, from the work queue."""

    def __init__(self, link: ClusterLink, render: RenderFunction, avatars: SharedAvatars) -> None:
        self.link = link
        self.render = render
        self.avatars = avatars
        self.stats = {"jobs_done": 0, "jobs_failed": 0}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="render jobs")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        subscription = None
        settings = self.link.settings
        while True:
            if not self.link.connected:
                subscription = None
                await asyncio.sleep(FETCH_WAIT_S / 4)
                continue
            try:
                if subscription is None:
                    stream = await self.link.ensure_jobs_stream()
                    config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=settings.job_ack_wait_s, max_deliver=-1)
                    subscription = await self.link.jetstream().pull_subscribe(
                        self.link.subject("jobs", "render"), durable=CONSUMER, stream=stream, config=config
                    )
                messages = await subscription.fetch(1, timeout=FETCH_WAIT_S)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            except Exception as error:  # noqa: BLE001 - the broker's bad moment: subscribe again
                log.debug("worker: fetching jobs failed: %s", error)
                subscription = None
                self.link.forget_buckets()
                await asyncio.sleep(FETCH_WAIT_S / 2)
                continue
            for message in messages:
                await self._take(message)

    async def _take(self, message: Msg) -> None:
        job = json.loads(message.data)
        attempt = message.metadata.num_delivered
        previous = await job_status(self.link, job["id"]) or JobStatus(job["id"], "queued", job["avatar"])
        if previous.finished:
            await message.ack()  # finished by an attempt that had ended just as this one was delivered
            return
        error = previous.error
        if previous.state == "running":  # the worker of the last attempt stopped without a word
            error = f"attempt {previous.attempts} ended without a result: worker {previous.worker} stopped"
        attempts = self.link.settings.job_attempts
        if attempt > attempts:
            await self._finish(message, replace(previous, state="failed", attempts=attempt - 1, error=error))
            return
        status = replace(previous, state="running", attempts=attempt, error=error, worker=self.link.node_id)
        await put_status(self.link, status)
        keep_alive = asyncio.create_task(self._still_working(message))
        try:
            rendered = await self._render(job)
        except Exception as failure:  # noqa: BLE001 - reported in the job's status, retried up to job_attempts
            log.warning("worker: render job %s attempt %d failed: %s", job["id"], attempt, failure)
            failed = replace(status, state="failed" if attempt >= attempts else "retrying", error=str(failure))
            if failed.state == "failed":
                await self._finish(message, failed)
            else:
                await put_status(self.link, failed)
                await message.nak(delay=0.5)
            return
        finally:
            keep_alive.cancel()
        done = replace(status, state="done", error=None, frames=rendered.frames, audio_seconds=rendered.audio_seconds)
        await self._finish(message, done)

    async def _finish(self, message: Msg, status: JobStatus) -> None:
        await put_status(self.link, status)
        await message.ack()
        self.stats["jobs_done" if status.state == "done" else "jobs_failed"] += 1

    async def _still_working(self, message: Msg) -> None:
        while True:
            await asyncio.sleep(self.link.settings.job_ack_wait_s / 3)
            if self.link.connected:
                await message.in_progress()

    async def _render(self, job: dict[str, str]) -> RenderedVideo:
        media = await _media(self.link)
        audio = (await media.get(audio_object(job["id"]))).data or b""
        if not await self.avatars.ensure(job["avatar"]):
            raise ValueError(f"no avatar {job['avatar']!r} on this worker or in the cluster")
        with tempfile.TemporaryDirectory(prefix="facecast-job-") as folder:
            audio_path, video_path = Path(folder) / "audio", Path(folder) / "video.mp4"
            audio_path.write_bytes(audio)
            rendered = await asyncio.to_thread(self.render, job["avatar"], audio_path, video_path)
            await media.put(video_object(job["id"]), video_path.read_bytes())
        return rendered


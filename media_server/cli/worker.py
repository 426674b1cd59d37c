"""``facecast worker --cluster nats://HOST:4222``: renders lip-sync for the cluster's media nodes, and its
render jobs, with the heavy engine this machine has (``lipsync.engine``, e.g. Wav2Lip on a GPU or Gaudi).

A worker needs only NATS: no ports, no browser reaches it. It takes at most ``cluster.worker_sessions``
speaking sessions at once (``--sessions``) and one render job at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

from engines.avatar import AvatarCatalogue, AvatarError
from engines.base import LipSyncEngine
from media_server.cli.render import RenderError, audio_of, lipsync_engine, render_speech
from media_server.cluster.avatars import SharedAvatars
from media_server.cluster.jobs import RenderedVideo, RenderJobs
from media_server.cluster.link import ClusterLink, redacted
from media_server.cluster.lipsync_service import LipSyncService
from media_server.cluster.registry import Heartbeat, NodeInfo, cpu_load
from media_server.config import Settings

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings, engine: LipSyncEngine, render_jobs: bool) -> None:
        self.settings = settings
        self.engine = engine
        self.link = ClusterLink(settings.cluster, role="worker")
        self.avatars = SharedAvatars(self.link, AvatarCatalogue(settings.server.avatars_dir))
        self.lipsync = LipSyncService(self.link, engine, self.avatars)
        self.jobs = RenderJobs(self.link, self.render, self.avatars) if render_jobs else None
        self.heartbeat = Heartbeat(self.link, self.describe)

    def describe(self) -> NodeInfo:
        return NodeInfo(
            id=self.link.node_id,
            role="worker",
            url=None,
            sessions=len(self.lipsync.leases),
            capacity=self.lipsync.capacity,
            avatars=self.avatars.catalogue.names(),
            engines={"lipsync": self.settings.lipsync.engine},
            stats={**self.lipsync.stats, **(self.jobs.stats if self.jobs else {})},
            cpu_load=cpu_load(),
            at=time.time(),
        )

    def render(self, avatar_name: str, audio_path: Path, out_path: Path) -> RenderedVideo:
        """One render job, with this worker's engine (already loaded: a job costs no model load)."""
        media = self.settings.media
        avatar = self.avatars.catalogue.get(avatar_name)
        try:
            audio = audio_of(audio_path, media.sample_rate)
        except RenderError as error:  # its message names the worker's temporary file
            raise RenderError(str(error).replace(str(audio_path), "the job's audio")) from None
        frames = render_speech(self.engine, avatar, audio, out_path, media, progress_stream=_Silent())
        return RenderedVideo(frames, len(audio) / media.sample_rate)

    async def run(self) -> None:
        await self.lipsync.prepare(self.avatars.catalogue.names())
        await self.link.start()
        self.heartbeat.start()
        if self.jobs is not None:
            self.jobs.start()
        print(f"Facecast worker {self.link.node_id} ready: cluster {redacted(self.link.url)}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await self.close()

    async def close(self) -> None:
        await self.heartbeat.stop()
        await self.lipsync.close()
        if self.jobs is not None:
            await self.jobs.close()
        await self.link.close()


class _Silent:
    """A progress stream nobody watches (a worker's log is not a terminal)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", metavar="URL", help="the NATS server, e.g. nats://nats.example.org:4222 (cluster.url)")
    parser.add_argument("--sessions", type=int, help="speaking sessions to render at once (cluster.worker_sessions)")
    parser.add_argument("--no-jobs", action="store_true", help="lip-sync for live sessions only, no render jobs")


def main(args: argparse.Namespace, settings: Settings) -> None:
    if settings.cluster.url is None:
        print("facecast: worker: a worker serves a cluster: give --cluster nats://HOST:4222 (or cluster.url)", file=sys.stderr)
        raise SystemExit(2)
    if args.sessions is not None:
        settings = settings.model_copy(
            update={"cluster": settings.cluster.model_copy(update={"worker_sessions": max(1, args.sessions)})}
        )
    engine = lipsync_engine(settings)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(Worker(settings, engine, render_jobs=not args.no_jobs).run())
    except AvatarError as error:
        print(f"facecast: worker: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        engine.close()

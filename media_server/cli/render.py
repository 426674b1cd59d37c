"""``facecast render --avatar NAME --audio reply.wav --out reply.mp4``: an avatar speaking a recording.

The offline counterpart of a live reply (OPEA's ``/v1/animation``): the audio goes through the very
lip-sync engine and stream the server uses (whichever ``lipsync.engine`` the configuration names),
pushed in half-second pieces, and the frames it returns, each with exactly its own audio, are encoded as
they come: H.264 video and AAC audio in an MP4 (``service/video.py``, which the server's
``/v1/animation`` uses too). With ``--cluster`` the render is a job for the cluster's workers, which run
``render_speech`` below.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from engines.avatar import Avatar, AvatarCatalogue, AvatarError
from engines.base import EngineConfigError, FaceEnhancer, LipSyncEngine
from engines.registry import create_engine
from media_server.cli.avatars import Progress
from media_server.cluster.shared import ClusterUnavailable
from media_server.config import MediaSettings, Settings
from media_server.service.audio import read_audio
from media_server.service.errors import BadInput
from media_server.service.video import SpeechVideo

PUSH_SECONDS = 0.5


class RenderError(ValueError):
    """The render cannot be done; the message says why."""


@dataclass(frozen=True)
class RenderSummary:
    path: Path
    frames: int
    audio_seconds: float
    render_seconds: float


def lipsync_engine(settings: Settings) -> LipSyncEngine:
    """The configured lip-sync engine, warmed up, with the face enhancer when one is configured (offline,
    a CPU has time for it)."""
    engine = create_engine("lipsync", settings.lipsync.engine, settings.lipsync.options)
    assert isinstance(engine, LipSyncEngine)
    engine.warm_up()
    if settings.enhancer is not None:
        enhancer = create_engine("enhancer", settings.enhancer.engine, settings.enhancer.options)
        assert isinstance(enhancer, FaceEnhancer)
        enhancer.warm_up()
        engine.use_enhancer(enhancer)
    return engine


def audio_of(path: Path, sample_rate: int) -> np.ndarray:
    """Any audio file FFmpeg can decode, as float32 mono at ``sample_rate``; RenderError saying why not."""
    try:
        return read_audio(path, sample_rate, what=str(path))
    except BadInput as error:
        raise RenderError(str(error)) from None


def render_speech(
    engine: LipSyncEngine,
    avatar: Avatar,
    audio: np.ndarray,
    out_path: Path,
    media: MediaSettings,
    progress_stream: TextIO = sys.stderr,
) -> int:
    """Write the MP4 of ``avatar`` speaking ``audio`` (float32 mono at ``media.sample_rate``) with ``engine``;
    the number of frames. Written under a temporary name and renamed when complete."""
    fps, sample_rate = media.fps, media.sample_rate
    engine.prepare(avatar)
    video = SpeechVideo(engine, avatar, out_path, fps, sample_rate)
    piece = int(PUSH_SECONDS * sample_rate)
    progress = Progress("rendering", -(-len(audio) * fps // sample_rate), progress_stream)
    try:
        for offset in range(0, len(audio), piece):
            progress.advance(video.push(audio[offset : offset + piece]))
        progress.advance(video.finish())
    except BaseException:
        video.abandon()
        raise
    progress.close()
    return video.frames


def _avatar(catalogue: AvatarCatalogue, name: str) -> Avatar:
    if name not in catalogue.names():
        raise RenderError(
            f"no avatar {name!r} in {catalogue.root}; there are: {', '.join(catalogue.names()) or 'none'}"
        )
    return catalogue.get(name)


def render(
    settings: Settings, avatar_name: str, audio_path: Path, out_path: Path, progress_stream: TextIO = sys.stderr
) -> RenderSummary:
    avatar = _avatar(AvatarCatalogue(settings.server.avatars_dir), avatar_name)
    audio = audio_of(audio_path, settings.media.sample_rate)
    engine = lipsync_engine(settings)
    started = time.perf_counter()
    try:
        frames = render_speech(engine, avatar, audio, out_path, settings.media, progress_stream)
    finally:
        engine.close()
    return RenderSummary(out_path, frames, len(audio) / settings.media.sample_rate, time.perf_counter() - started)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--avatar", required=True, help="an avatar folder name under server.avatars_dir")
    parser.add_argument("--audio", required=True, type=Path, help="the speech: any audio file FFmpeg can decode")
    parser.add_argument("--out", required=True, type=Path, help="the MP4 to write (H.264 + AAC)")
    parser.add_argument("--cluster", metavar="URL", help="render on the workers of this NATS cluster (cluster.url)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="with --cluster: how long to wait for a worker to render it (s)"
    )


def main(args: argparse.Namespace, settings: Settings) -> None:
    """Run ``facecast render`` (here, or as a job for a cluster's workers with ``--cluster``); a problem
    prints its reason and exits with status 2."""
    try:
        if settings.cluster.url is not None:
            from media_server.cli.cluster_tools import render_in_cluster  # imports NATS: only for a cluster

            print(asyncio.run(render_in_cluster(settings, args.avatar, args.audio, args.out, args.timeout)))
            return
        summary = render(settings, args.avatar, args.audio, args.out)
    except (RenderError, AvatarError, EngineConfigError, ClusterUnavailable) as error:
        print(f"facecast: render: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"wrote {summary.path}: {summary.frames} frames, {summary.audio_seconds:.2f} s of audio, rendered in "
        f"{summary.render_seconds:.1f} s ({summary.frames / max(summary.render_seconds, 1e-9):.1f} frames/s) "
        f"with lipsync.engine = {settings.lipsync.engine!r}"
    )

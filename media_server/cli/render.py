"""``facecast render --avatar NAME --audio reply.wav --out reply.mp4``: an avatar speaking a recording.

The offline counterpart of a live reply (OPEA's ``/v1/animation``): the audio goes through the very
lip-sync engine and stream the server uses (whichever ``lipsync.engine`` the configuration names),
pushed in half-second pieces, and the frames it returns, each with exactly its own audio, are encoded as
they come: H.264 video and AAC audio in an MP4 (``service/video.py``, which the server's
``/v1/animation`` uses too).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from engines.avatar import AvatarCatalogue, AvatarError
from engines.base import EngineConfigError, FaceEnhancer, LipSyncEngine
from engines.registry import create_engine
from media_server.cli.avatars import Progress
from media_server.config import Settings
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


def _engine(settings: Settings) -> LipSyncEngine:
    engine = create_engine("lipsync", settings.lipsync.engine, settings.lipsync.options)
    assert isinstance(engine, LipSyncEngine)
    engine.warm_up()
    if settings.enhancer is not None:  # offline, a CPU has time for it
        enhancer = create_engine("enhancer", settings.enhancer.engine, settings.enhancer.options)
        assert isinstance(enhancer, FaceEnhancer)
        enhancer.warm_up()
        engine.use_enhancer(enhancer)
    return engine


def render(
    settings: Settings, avatar_name: str, audio_path: Path, out_path: Path, progress_stream: TextIO = sys.stderr
) -> RenderSummary:
    catalogue = AvatarCatalogue(settings.server.avatars_dir)
    if avatar_name not in catalogue.names():
        raise RenderError(
            f"no avatar {avatar_name!r} in {catalogue.root}; there are: {', '.join(catalogue.names()) or 'none'}"
        )
    fps, sample_rate = settings.media.fps, settings.media.sample_rate
    try:
        audio = read_audio(audio_path, sample_rate, what=str(audio_path))
    except BadInput as error:
        raise RenderError(str(error)) from None
    avatar = catalogue.get(avatar_name)
    engine = _engine(settings)
    started = time.perf_counter()
    try:
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
    finally:
        engine.close()
    return RenderSummary(out_path, video.frames, len(audio) / sample_rate, time.perf_counter() - started)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--avatar", required=True, help="an avatar folder name under server.avatars_dir")
    parser.add_argument("--audio", required=True, type=Path, help="the speech: any audio file FFmpeg can decode")
    parser.add_argument("--out", required=True, type=Path, help="the MP4 to write (H.264 + AAC)")


def main(args: argparse.Namespace, settings: Settings) -> None:
    """Run ``facecast render``; a problem prints its reason and exits with status 2."""
    try:
        summary = render(settings, args.avatar, args.audio, args.out)
    except (RenderError, AvatarError, EngineConfigError) as error:
        print(f"facecast: render: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"wrote {summary.path}: {summary.frames} frames, {summary.audio_seconds:.2f} s of audio, rendered in "
        f"{summary.render_seconds:.1f} s ({summary.frames / max(summary.render_seconds, 1e-9):.1f} frames/s) "
        f"with lipsync.engine = {settings.lipsync.engine!r}"
    )

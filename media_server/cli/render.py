"""``facecast render --avatar NAME --audio reply.wav --out reply.mp4``: an avatar speaking a recording.

The offline counterpart of a live reply (OPEA's ``/v1/animation``): the audio goes through the very
lip-sync engine and stream the server uses (whichever ``lipsync.engine`` the configuration names),
pushed in half-second pieces and pulled as it goes, and the frames it returns, each with exactly its
own audio, are encoded as they come: H.264 video and AAC audio in an MP4. The file is written under
a temporary name next to ``--out`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import av
import numpy as np

from engines.avatar import Avatar, AvatarCatalogue, AvatarError
from engines.base import AVFrame, EngineConfigError, FaceEnhancer, LipSyncEngine
from engines.registry import create_engine
from media_server.cli.avatars import Progress
from media_server.cluster.shared import ClusterUnavailable
from media_server.config import MediaSettings, Settings

PUSH_SECONDS = 0.5
VIDEO_CODEC, AUDIO_CODEC = "libx264", "aac"
VIDEO_OPTIONS = {"crf": "20", "preset": "veryfast"}
AUDIO_BIT_RATE = 128_000


class RenderError(ValueError):
    """The render cannot be done; the message says why."""


@dataclass(frozen=True)
class RenderSummary:
    path: Path
    frames: int
    audio_seconds: float
    render_seconds: float


def read_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Any audio FFmpeg can decode, as float32 mono at ``sample_rate``."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    parts: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise RenderError(f"{path} holds no audio stream")
            for frame in container.decode(audio=0):
                parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise RenderError(f"{path} could not be read as audio: {error}") from error
    parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    audio = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if not audio.size:
        raise RenderError(f"{path} holds no audio samples")
    return audio


class _Mp4Writer:
    """Encodes AVFrames as they come: frame k is video pts k and audio samples [k*spf, (k+1)*spf)."""

    def __init__(
        self, container: av.container.OutputContainer, size: tuple[int, int], fps: int, sample_rate: int
    ) -> None:
        self.container = container
        self.sample_rate = sample_rate
        self.video = container.add_stream(VIDEO_CODEC, rate=fps, options=VIDEO_OPTIONS)
        self.video.width, self.video.height = size
        self.video.pix_fmt = "yuv420p"
        self.video.time_base = fractions.Fraction(1, fps)
        self.audio = container.add_stream(AUDIO_CODEC, rate=sample_rate, layout="mono")
        self.audio.bit_rate = AUDIO_BIT_RATE
        self.frames = 0
        self._samples = 0

    def write(self, frames: list[AVFrame]) -> None:
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame.video, format="bgr24")
            picture.pts = self.frames
            self.container.mux(self.video.encode(picture))
            sound = av.AudioFrame.from_ndarray(frame.audio[None, :].astype(np.float32), format="flt", layout="mono")
            sound.sample_rate = self.sample_rate
            sound.pts = self._samples
            sound.time_base = fractions.Fraction(1, self.sample_rate)
            self.container.mux(self.audio.encode(sound))
            self.frames += 1
            self._samples += len(frame.audio)

    def flush(self) -> None:
        self.container.mux(self.video.encode(None))
        self.container.mux(self.audio.encode(None))


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
    stream = engine.open_stream(avatar, fps, sample_rate)
    piece = int(PUSH_SECONDS * sample_rate)
    progress = Progress("rendering", -(-len(audio) * fps // sample_rate), progress_stream)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_path.with_name(f".{out_path.stem}.{os.getpid()}.partial.mp4")
    try:
        with av.open(temporary, "w", format="mp4") as container:
            writer = _Mp4Writer(container, avatar.size, fps, sample_rate)
            for offset in range(0, len(audio), piece):
                stream.push_audio(audio[offset : offset + piece])
                frames = stream.pull()
                writer.write(frames)
                progress.advance(len(frames))
            stream.end_segment()
            frames = stream.pull()
            writer.write(frames)
            progress.advance(len(frames))
            writer.flush()
        progress.close()
        os.replace(temporary, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return writer.frames


def _avatar(catalogue: AvatarCatalogue, name: str) -> Avatar:
    if name not in catalogue.names():
        raise RenderError(f"no avatar {name!r} in {catalogue.root}; there are: {', '.join(catalogue.names()) or 'none'}")
    return catalogue.get(name)


def render(
    settings: Settings, avatar_name: str, audio_path: Path, out_path: Path, progress_stream: TextIO = sys.stderr
) -> RenderSummary:
    avatar = _avatar(AvatarCatalogue(settings.server.avatars_dir), avatar_name)
    audio = read_audio(audio_path, settings.media.sample_rate)
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

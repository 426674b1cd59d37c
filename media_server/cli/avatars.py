"""``facecast avatars add NAME photo.jpg|clip.mp4``: a new avatar from a photo or a short video loop.

The source is checked (type, size, dimensions, decodable), copied into a hidden staging folder
under the avatars folder, its face found in every frame (with progress; temporally smoothed for a
video), the face boxes cached under ``.cache/<content hash>/`` where the server reads them, and an
``avatar.toml`` written. The staging folder becomes ``avatars/NAME`` with one rename only once all of
that has worked and the avatar loads; on any error or interruption it is deleted, so nothing
half-written is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import av
import numpy as np

from engines.avatar import (
    IMAGE_SUFFIXES,
    MAX_SOURCE_BYTES,
    VIDEO_SUFFIXES,
    AvatarError,
    FaceBox,
    detect_face,
    load_avatar,
    read_source_frames,
    smooth_boxes,
)
from engines.embedded_models import sha256_of
from media_server.cluster.shared import ClusterUnavailable
from media_server.config import ConfigError, Settings

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_DIMENSION = 8192  # per side, checked before decoding: a small file can still hold an enormous picture
MAX_MISSED_FRACTION = 0.1  # of a video's frames where the face may go undetected (blur); they borrow a neighbour's


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second.

    ``scale`` and ``unit`` show byte counts as e.g. MB (scale 2**20, unit " MB").
    """

    def __init__(
        self, label: str, total: int | None, stream: TextIO = sys.stderr, scale: float = 1, unit: str = ""
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.scale = scale
        self.unit = unit
        self.done = 0
        self._drawn_at = 0.0
        self._drawn: int | None = None

    def advance(self, amount: int = 1) -> None:
        self.done += amount
        now = time.monotonic()
        if now - self._drawn_at >= 0.1 or self.done == self.total:
            self._drawn_at = now
            self._draw()

    def _amount(self, value: int) -> str:
        return f"{value / self.scale:.1f}" if self.scale != 1 else str(value)

    def _draw(self) -> None:
        self._drawn = self.done
        if self.total:
            filled = int(30 * min(self.done, self.total) / self.total)
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self._amount(self.done)}/{self._amount(self.total)}{self.unit}")
        else:
            self.stream.write(f"\r{self.label} {self._amount(self.done)}{self.unit}")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn != self.done:
            self._draw()
        self.stream.write("\n")
        self.stream.flush()


def _check_source(source: Path) -> None:
    """Everything that can be known about the source before decoding it."""
    if not source.is_file():
        raise AvatarError(f"{source} does not exist or is not a file")
    suffix = source.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise AvatarError(
            f"{source.name}: unsupported file type {suffix or '(none)'!r}; use a photo "
            f"({', '.join(IMAGE_SUFFIXES)}) or a video ({', '.join(VIDEO_SUFFIXES)})"
        )
    size = source.stat().st_size
    if size > MAX_SOURCE_BYTES:
        raise AvatarError(f"{source.name} is {size / 2**20:.0f} MB; the limit is {MAX_SOURCE_BYTES // 2**20} MB")
    try:
        with av.open(str(source)) as container:
            if not container.streams.video:
                raise AvatarError(f"{source.name} holds no picture or video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            codec = stream.codec_context.name
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise AvatarError(f"{source.name} is corrupt or not a picture/video FFmpeg can read: {error}") from error
    except av.codec.codec.UnknownCodecError as error:
        raise AvatarError(f"{source.name} uses a codec this build cannot decode: {error}") from error
    if width == 0 or height == 0:
        raise AvatarError(
            f"{source.name} is corrupt or its codec is unsupported: its {codec!r} stream has no picture size"
        )
    if max(width, height) > MAX_DIMENSION:
        raise AvatarError(f"{source.name} is {width}x{height}; at most {MAX_DIMENSION} pixels per side, please")


def _detect_faces(frames: list[np.ndarray], progress: Progress) -> list[FaceBox]:
    """One face box per frame; a video may miss the face in a few frames, which borrow the nearest one's."""
    found: dict[int, FaceBox] = {}
    for index, frame in enumerate(frames):
        try:
            found[index] = detect_face(frame)
        except AvatarError as error:
            if len(frames) == 1 or not str(error).startswith("no face"):
                where = "" if len(frames) == 1 else f"frame {index}: "
                raise AvatarError(f"{where}{error}") from None
        progress.advance()
    progress.close()
    missed = len(frames) - len(found)
    if missed > MAX_MISSED_FRACTION * len(frames):
        raise AvatarError(
            f"no face found in {missed} of {len(frames)} frames: use a video where one face is visible, frontal and "
            "well lit throughout"
        )
    return [found[min(found, key=lambda detected: abs(detected - index))] for index in range(len(frames))]


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


def _avatar_toml(
    source_name: str, display_name: str, voice: str | None, persona: str | None, pads: list[float] | None
) -> str:
    lines = [f"display_name = {_toml_string(display_name)}", f"source = {_toml_string(source_name)}"]
    if voice:
        lines.append(f"voice = {_toml_string(voice)}")
    if persona:
        lines.append(f"persona = {_toml_string(persona)}")
    if pads is not None:
        lines.append(
            f"pads = [{', '.join(repr(float(p)) for p in pads)}]  # top, bottom, left, right, in face-box units"
        )
    return "\n".join(lines) + "\n"


def add_avatar(
    root: Path,
    name: str,
    source: Path,
    *,
    display_name: str | None = None,
    voice: str | None = None,
    persona: str | None = None,
    pads: list[float] | None = None,
    replace: bool = False,
    progress_stream: TextIO = sys.stderr,
) -> Path:
    """Create ``root/name`` from ``source``; AvatarError (and nothing left on disk) if anything is wrong."""
    if not NAME_PATTERN.fullmatch(name):
        raise AvatarError(
            f"avatar name {name!r}: use 1-64 lower-case letters, digits, '-' or '_', starting with a letter or digit"
        )
    final = root / name
    if final.exists() and not replace:
        raise AvatarError(f"avatar {name!r} already exists in {root}; pass --replace to replace it")
    _check_source(source)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".adding-{name}-", dir=root))  # hidden: the catalogue skips it
    try:
        copied = staging / f"source{source.suffix.lower()}"
        shutil.copyfile(source, copied)
        frames = read_source_frames(copied)
        kind = "photo" if len(frames) == 1 else f"video, {len(frames)} frames"
        boxes = _detect_faces(frames, Progress(f"finding the face ({kind})", len(frames), progress_stream))
        if len(boxes) > 1:
            boxes = smooth_boxes(boxes)
        cache = staging / ".cache" / sha256_of(copied)[:16]
        cache.mkdir(parents=True)
        (cache / "faces.json").write_text(json.dumps([[b.x0, b.y0, b.x1, b.y1] for b in boxes]))
        (staging / "avatar.toml").write_text(_avatar_toml(copied.name, display_name or name, voice, persona, pads))
        load_avatar(staging)  # exactly what the server will do: it must work before the avatar appears
        _move_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _move_into_place(staging: Path, final: Path) -> None:
    if not final.exists():
        os.rename(staging, final)
        return
    retired = final.with_name(f".replaced-{final.name}-{os.getpid()}")
    os.rename(final, retired)
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(retired, final)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def avatar_of_face(settings: Settings, progress_stream: TextIO = sys.stderr) -> Settings:
    """``settings`` with ``server.default_avatar`` an avatar name: OPEA's FACE may name a photo or video file
    instead, which becomes an avatar named after the file (added once, again only when the file changes)."""
    face = Path(settings.server.default_avatar)
    if face.suffix.lower() not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        return settings
    name = re.sub(r"[^a-z0-9_-]+", "-", face.stem.lower()).strip("-_")[:64] or "face"
    root = settings.server.avatars_dir
    folder = root / name
    try:
        if not folder.is_dir() or load_avatar(folder).source_hash != sha256_of(face):
            add_avatar(root, name, face, replace=True, progress_stream=progress_stream)
    except (AvatarError, OSError) as error:
        message = f"server.default_avatar (or OPEA's FACE) {str(face)!r} cannot be an avatar: {error}"
        raise ConfigError(message) from None
    server = settings.server.model_copy(update={"default_avatar": name})
    return settings.model_copy(update={"server": server})


def configure_parser(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="avatars_command", required=True)
    add = commands.add_parser("add", help="add an avatar from a photo or a short video loop")
    add.add_argument("name", help="folder name under server.avatars_dir: lower-case letters, digits, - and _")
    add.add_argument(
        "source", type=Path, help=f"a photo ({', '.join(IMAGE_SUFFIXES)}) or video ({', '.join(VIDEO_SUFFIXES)})"
    )
    add.add_argument("--display-name", help="the name shown on the page (default: NAME)")
    add.add_argument("--voice", help="the avatar's default TTS voice")
    add.add_argument("--persona", help="the avatar's default persona")
    add.add_argument(
        "--pads",
        type=float,
        nargs=4,
        metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
        help="Wav2Lip face-crop padding in face-box heights/widths (default: lipsync.pads)",
    )
    add.add_argument("--replace", action="store_true", help="replace an existing avatar of that name")
    add.add_argument("--cluster", metavar="URL", help="also share it with the nodes and workers of this NATS cluster")


def main(args: argparse.Namespace, settings: Settings) -> None:
    """Run ``facecast avatars ...``; a bad source prints the problem and exits with status 2."""
    try:
        folder = add_avatar(
            settings.server.avatars_dir,
            args.name,
            args.source,
            display_name=args.display_name,
            voice=args.voice,
            persona=args.persona,
            pads=args.pads,
            replace=args.replace,
        )
    except AvatarError as error:
        print(f"facecast: avatars add: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"added avatar {args.name!r} in {folder}")
    if settings.cluster.url is not None:
        from media_server.cli.cluster_tools import share_avatar  # imports NATS: only for a cluster

        try:
            asyncio.run(share_avatar(settings, folder))
        except ClusterUnavailable as error:
            print(f"facecast: avatars add: added here, but not shared with the cluster: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"shared avatar {args.name!r} with cluster {settings.cluster.name!r}")

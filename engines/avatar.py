"""Avatars on disk: ``avatars/NAME/`` with a source image (or video loop) and an ``avatar.toml``.

Face boxes are found offline with OpenCV's bundled Haar cascade and cached next to
the source, keyed by the source's content hash, so preprocessing runs once.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engines.embedded_models import sha256_of

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv")
MAX_SOURCE_BYTES = 200 * 1024 * 1024
MAX_SIDE = 1920


class AvatarError(ValueError):
    """A problem with an avatar's files that the user can fix; the message says what."""


@dataclass(frozen=True)
class FaceBox:
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0

    @property
    def mouth_center(self) -> tuple[float, float]:
        """Where the lips meet, from the proportions of a frontal Haar face box."""
        return (self.x0 + self.x1) / 2.0, self.y0 + 0.79 * self.height

    @property
    def mouth_width(self) -> float:
        return 0.36 * self.width

    @property
    def eye_centers(self) -> tuple[tuple[float, float], tuple[float, float]]:
        cx, _ = self.center
        y = self.y0 + 0.40 * self.height
        dx = 0.19 * self.width
        return (cx - dx, y), (cx + dx, y)


@dataclass(frozen=True)
class Avatar:
    name: str
    display_name: str
    directory: Path
    frames: tuple[np.ndarray, ...]  # BGR uint8; one for a photo, the loop for a video
    face_boxes: tuple[FaceBox, ...]  # one per frame
    source_hash: str
    default_voice: str | None = None
    persona: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        height, width = self.frames[0].shape[:2]
        return width, height

    @property
    def is_video(self) -> bool:
        return len(self.frames) > 1

    @property
    def cache_dir(self) -> Path:
        return self.directory / ".cache" / self.source_hash[:16]


def _face_cascade() -> cv2.CascadeClassifier:
    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def detect_face(frame: np.ndarray) -> FaceBox:
    """The one face in ``frame``; AvatarError if there is none or several of similar size."""
    gray = cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    min_side = max(40, min(gray.shape) // 10)
    found = _face_cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=6, minSize=(min_side, min_side))
    if len(found) == 0:
        raise AvatarError("no face found: use a well-lit, frontal photo where the face is at least 1/10 of the picture")
    boxes = sorted((FaceBox(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in found), key=lambda b: -b.width)
    if len(boxes) > 1 and boxes[1].width > 0.6 * boxes[0].width:
        raise AvatarError(f"{len(boxes)} faces found: the avatar's source must show exactly one person")
    return boxes[0]


def smooth_boxes(boxes: list[FaceBox], radius: int = 2) -> list[FaceBox]:
    """Moving average over neighbouring frames so a video avatar's face box does not jitter."""
    coords = np.array([[b.x0, b.y0, b.x1, b.y1] for b in boxes], dtype=np.float64)
    smoothed = np.empty_like(coords)
    for i in range(len(coords)):
        lo, hi = max(0, i - radius), min(len(coords), i + radius + 1)
        smoothed[i] = coords[lo:hi].mean(axis=0)
    return [FaceBox(*(int(round(v)) for v in row)) for row in smoothed]


def _fit(frame: np.ndarray) -> np.ndarray:
    """Even dimensions (video encoders need them), longest side at most MAX_SIDE."""
    height, width = frame.shape[:2]
    scale = min(1.0, MAX_SIDE / max(height, width))
    new_w, new_h = int(width * scale) // 2 * 2, int(height * scale) // 2 * 2
    if (new_w, new_h) != (width, height):
        frame = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(frame)


def read_source_frames(path: Path, max_frames: int = 250) -> list[np.ndarray]:
    """Decode a photo, or a video's frames (at most ``max_frames``), as BGR uint8."""
    if path.stat().st_size > MAX_SOURCE_BYTES:
        raise AvatarError(f"{path.name} is larger than {MAX_SOURCE_BYTES // (1024 * 1024)} MB")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise AvatarError(f"{path.name} is not a readable image")
        return [_fit(image)]
    if suffix in VIDEO_SUFFIXES:
        return _read_video(path, max_frames)
    raise AvatarError(f"{path.name}: unsupported file type; use one of {', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)}")


def _read_video(path: Path, max_frames: int) -> list[np.ndarray]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise AvatarError(f"{path.name} has no video stream")
            frames = []
            for frame in container.decode(video=0):
                frames.append(_fit(frame.to_ndarray(format="bgr24")))
                if len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise AvatarError(f"{path.name} could not be decoded: {error}") from error
    if not frames:
        raise AvatarError(f"{path.name} holds no video frames")
    return frames


def find_source(directory: Path) -> Path:
    candidates = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES
    )
    if not candidates:
        raise AvatarError(f"avatar folder {directory} holds no image or video")
    return candidates[0]


def load_avatar(directory: Path) -> Avatar:
    """Read ``avatars/NAME``: settings, source frames and (cached) face boxes."""
    settings_path = directory / "avatar.toml"
    settings = tomllib.loads(settings_path.read_text()) if settings_path.exists() else {}
    source = directory / settings["source"] if "source" in settings else find_source(directory)
    source_hash = sha256_of(source)
    frames = read_source_frames(source)
    cache_file = directory / ".cache" / source_hash[:16] / "faces.json"
    if cache_file.exists():
        boxes = [FaceBox(*row) for row in json.loads(cache_file.read_text())]
    else:
        boxes = smooth_boxes([detect_face(frame) for frame in frames])
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps([[b.x0, b.y0, b.x1, b.y1] for b in boxes]))
    return Avatar(
        name=directory.name,
        display_name=settings.get("display_name", directory.name),
        directory=directory,
        frames=tuple(frames),
        face_boxes=tuple(boxes),
        source_hash=source_hash,
        default_voice=settings.get("voice"),
        persona=settings.get("persona"),
    )


class AvatarCatalogue:
    """The avatars under one folder, loaded once each and shared by all sessions."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loaded: dict[str, Avatar] = {}

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def get(self, name: str) -> Avatar:
        if name not in self._loaded:
            if name not in self.names():
                raise KeyError(name)
            self._loaded[name] = load_avatar(self.root / name)
        return self._loaded[name]

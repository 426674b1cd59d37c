"""Wav2Lip's face crops in and out of a full-resolution avatar frame.

In: the face box, padded (``pads``: top, bottom, left, right in face-box heights/widths), is cut out
and resized to the generator's 96x96 input: BGR in [0, 1], the lower half of the target zeroed and
the unmasked crop beside it as the reference (6 channels).

Out: the generator's 96x96 face is colour-matched to the original crop (mean and standard deviation
per Lab channel, measured on the skin around the mouth so an opening mouth does not shift the
statistics), scaled back to the crop's size and blended in through a feathered ellipse over the
mouth, cheeks and chin. The ellipse fades to zero well inside the crop, so no rectangle shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from engines.avatar import FaceBox

FACE_SIZE = 96
# The blended ellipse, in crop heights/widths: from just below the crop's middle to just above its bottom.
ELLIPSE_CENTRE_Y, ELLIPSE_HALF_HEIGHT = 0.74, 0.24
ELLIPSE_HALF_WIDTH = 0.34
FEATHER_START = 0.55  # normalised ellipse radius where the blend starts to fade; 0 at radius 1
# Left out of the colour statistics: the lips and whatever the opening mouth shows (face-box units).
MOUTH_HALF_WIDTH_W, MOUTH_HALF_HEIGHT_H, MOUTH_DROP_H = 0.27, 0.16, 0.03
STD_RATIO_LIMITS = (0.5, 2.0)


@dataclass(frozen=True)
class CropBox(FaceBox):
    """A region of a frame in pixels (the padded face crop the generator sees)."""

    def cut(self, frame: np.ndarray) -> np.ndarray:
        return frame[self.y0 : self.y1, self.x0 : self.x1]


def face_crop(frame_shape: tuple[int, ...], face: FaceBox, pads: tuple[float, float, float, float]) -> CropBox:
    """The face box grown by ``pads`` (top, bottom, left, right; fractions of its height/width), inside the frame."""
    top, bottom, left, right = pads
    height, width = frame_shape[:2]
    return CropBox(
        max(0, int(round(face.x0 - left * face.width))),
        max(0, int(round(face.y0 - top * face.height))),
        min(width, int(round(face.x1 + right * face.width))),
        min(height, int(round(face.y1 + bottom * face.height))),
    )


def generator_input(frame: np.ndarray, crop: CropBox) -> np.ndarray:
    """(6, 96, 96) float32: the crop with its lower half zeroed, then the whole crop as reference."""
    face = cv2.resize(crop.cut(frame), (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_AREA)
    reference = face.astype(np.float32).transpose(2, 0, 1) / 255.0
    masked = reference.copy()
    masked[:, FACE_SIZE // 2 :] = 0.0
    return np.concatenate([masked, reference])


def _ellipse_radius(shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return np.sqrt(((cols + 0.5 - centre[0]) / axes[0]) ** 2 + ((rows + 0.5 - centre[1]) / axes[1]) ** 2)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _weighted_stats(lab: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = float(weight.sum())
    mean = (lab * weight).sum(axis=(0, 1)) / total
    variance = (((lab - mean) ** 2) * weight).sum(axis=(0, 1)) / total
    return mean, np.sqrt(np.maximum(variance, 1e-6))


@dataclass(frozen=True)
class PasteRegion:
    """Everything pasting into one avatar frame needs, computed once per frame."""

    crop: CropBox
    alpha: np.ndarray  # (h, w, 1) float32: the feathered ellipse at the crop's full resolution
    stats_weight: np.ndarray  # (96, 96, 1) float32: the skin where colours are compared
    target_mean: np.ndarray  # (3,) Lab mean of the original crop under stats_weight
    target_std: np.ndarray  # (3,)

    @staticmethod
    def build(frame: np.ndarray, face: FaceBox, crop: CropBox) -> PasteRegion:
        mouth_x = min(max(face.mouth_center[0] - crop.x0, 1.0), crop.width - 1.0)
        half_width = min(ELLIPSE_HALF_WIDTH * crop.width, mouth_x, crop.width - mouth_x)
        centre = (mouth_x, ELLIPSE_CENTRE_Y * crop.height)
        axes = (half_width, ELLIPSE_HALF_HEIGHT * crop.height)
        radius = _ellipse_radius((crop.height, crop.width), centre, axes)
        alpha = 1.0 - _smoothstep(FEATHER_START, 1.0, radius)

        # The same geometry at the generator's 96x96 scale, for the colour statistics.
        sx, sy = FACE_SIZE / crop.width, FACE_SIZE / crop.height
        small = (FACE_SIZE, FACE_SIZE)
        inside = _ellipse_radius(small, (centre[0] * sx, centre[1] * sy), (axes[0] * sx, axes[1] * sy)) < 1.0
        mouth_y = face.mouth_center[1] + MOUTH_DROP_H * face.height - crop.y0
        mouth_axes = (MOUTH_HALF_WIDTH_W * face.width * sx, MOUTH_HALF_HEIGHT_H * face.height * sy)
        outside_mouth = _ellipse_radius(small, (mouth_x * sx, mouth_y * sy), mouth_axes) >= 1.0
        weight = (inside & outside_mouth).astype(np.float32)[..., None]
        original = cv2.resize(crop.cut(frame), small, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        mean, std = _weighted_stats(cv2.cvtColor(original, cv2.COLOR_BGR2Lab), weight)
        return PasteRegion(crop, alpha.astype(np.float32)[..., None], weight, mean, std)

    @property
    def nbytes(self) -> int:
        return self.alpha.nbytes + self.stats_weight.nbytes


def match_colours(generated: np.ndarray, region: PasteRegion) -> np.ndarray:
    """The generated (96, 96, 3) BGR [0, 1] face with the original crop's Lab mean and spread around the mouth."""
    lab = cv2.cvtColor(np.ascontiguousarray(generated, dtype=np.float32), cv2.COLOR_BGR2Lab)
    mean, std = _weighted_stats(lab, region.stats_weight)
    ratio = np.clip(region.target_std / std, *STD_RATIO_LIMITS)
    matched = (lab - mean) * ratio + region.target_mean
    return np.clip(cv2.cvtColor(matched.astype(np.float32), cv2.COLOR_Lab2BGR), 0.0, 1.0)


def paste(
    frame: np.ndarray,
    generated: np.ndarray,
    region: PasteRegion,
    strength: float = 1.0,
    enhance: Callable[[np.ndarray], np.ndarray] | None = None,
) -> None:
    """Blend the generated (96, 96, 3) BGR [0, 1] face into ``frame`` (uint8 BGR) in place.

    ``strength`` scales the blend, so speech can fade in from and out to the avatar's own mouth;
    ``enhance`` (a face enhancer) restores the face at the crop's size before it is blended.
    """
    if strength <= 0.0:
        return
    crop = region.crop
    face = cv2.resize(match_colours(generated, region), (crop.width, crop.height), interpolation=cv2.INTER_CUBIC)
    if enhance is not None:
        face = enhance(np.clip(face * 255.0 + 0.5, 0, 255).astype(np.uint8)).astype(np.float32) / 255.0
    target = crop.cut(frame)
    original = target.astype(np.float32)
    alpha = region.alpha * strength if strength < 1.0 else region.alpha
    blended = original + (face * 255.0 - original) * alpha
    target[:] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)

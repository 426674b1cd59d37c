"""Lip-sync without weights: the avatar's own pixels are warped to open the jaw, shape the lips and blink.

Mouth: each frame's audio span gives its loudness (RMS in dB, measured against a slowly adapting
speech level so loud and quiet voices both use the full range) and its spectral balance (energy at
1.8-5 kHz against 150-900 Hz: rounded vowels like 'oo' are dark, 'ee' and sibilants bright). Loudness
opens the jaw with a fast attack and a slower release, so the mouth closes in the gaps between words;
the balance narrows or widens the lips. Frame k is rendered only once frame k+1's audio is there (or
its segment has ended): one frame (40 ms at 25 fps) of look-ahead lets the lips move slightly before
the sound they make, as real lips do. Phoneme timings are accepted and not used: the audio alone
drives the mouth, since the default voice gives none.

Rendering: pixels below the lip line move down with a smooth displacement field (``cv2.remap``):
the lower lip and chin fully, the cheeks and neck less and less, the upper lip barely. The gap this
opens is painted as the mouth's dark interior through a feathered mask. Blinks blend a lid (the eye
inpainted with the surrounding skin, precomputed) down over the eye with a soft lash line at its
edge. A slow sub-degree rotation and 1-2 px drift of the whole frame (``cv2.warpAffine``) runs
continuously, through speech and idle alike, so the avatar never looks like a frozen photo.

The drift is shown in steps of about a third of a pixel: the head on screen moves on once the drift
is that far from where it is shown. A still frame (no speech, no blink, no step) is the previous one,
returned again as the same array: the caller sends nothing new for it, and an idle stream at the full
frame rate changes its picture only a few times a second besides its blinks.

Everything that depends only on the avatar (lip line, eye positions, closed-eye patches, warp
templates) is computed once in ``prepare``; a stream keeps only a few floats and its pending audio.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import cv2
import numpy as np
from pydantic import Field, model_validator

from engines.base import AVFrame, EngineSettings, LipSyncEngine
from engines.lipsync.segments import SegmentedStream

if TYPE_CHECKING:
    from engines.avatar import Avatar, FaceBox

LOOK_AHEAD_FRAMES = 1
ANTICIPATION = 0.5  # how much of the next frame's opening is already shown
ATTACK_S = 0.03  # time constants of the mouth opening towards louder and quieter targets
RELEASE_S = 0.07
LEVEL_SPAN_DB = 24.0  # below the tracked speech level, this much quieter is a closed mouth
LEVEL_START_DB = -14.0
LEVEL_MIN_DB = -32.0
LEVEL_DECAY_DB_S = 1.0
OPEN_CURVE = 1.4  # >1 keeps mid-loud frames less open, so the loud syllables stand out
LOW_BAND_HZ = (150.0, 900.0)
HIGH_BAND_HZ = (1800.0, 5000.0)
BALANCE_CENTRE_DB, BALANCE_SPAN_DB = -10.0, 8.0
NASAL_DB = (-16.0, -22.0)

# Geometry, in face-box widths (w) and heights (h), measured from the lip line's centre.
MOUTH_HALF_WIDTH = 0.56  # of FaceBox.mouth_width: the Haar proportion is a little narrow
JAW_FULL_W, JAW_NONE_W = 0.30, 0.55  # the jaw moves fully within, not at all beyond
CHEEK_RAMP_H = 0.22  # beside the lips the skin follows the jaw more the further down it is
CHIN_H, NECK_FALLOFF_H = 0.30, 0.30
UPPER_LIFT = 0.12  # upper lip rises by this fraction of the jaw drop ...
UPPER_LIFT_H = 0.10  # ... fading out over this height
ROI_ABOVE_H = 0.14
PUCKER_ABOVE_H, PUCKER_BELOW_H = 0.12, 0.25  # the lips round over this height around their line
EYE_W, EYE_H = 0.22, 0.085
HEAD_PIVOT_BELOW_H = 0.35  # the head turns about a point in the neck

BLINK_TIMES_S = (0.0, 0.04, 0.08, 0.12, 0.16, 0.20, 0.24, 0.28)
BLINK_CLOSURE = (0.0, 0.45, 0.9, 1.0, 0.75, 0.45, 0.2, 0.0)
MOTION_FREQ_HZ = (0.04, 0.25)
CROWN_ABOVE_PIVOT_H = 1.35  # the crown, the point a head turn moves furthest
HEAD_STEP_PX = 0.35  # the shown head moves on once the drift is this far (at the crown) from it
MOUTH_SHUT = 1e-3  # an openness and a lip shape below this are a closed mouth at rest


class WarpLipSync(LipSyncEngine):
    """Audio-driven warp of the avatar's own face: no weights, a few ms per 512x512 frame on one core."""

    class Settings(EngineSettings):
        mouth_gain: float = Field(1.0, gt=0.0, le=4.0)  # scales how far a given loudness opens the mouth
        max_jaw_open: float = Field(0.09, gt=0.0, le=0.2)  # jaw drop at full loudness, in face heights
        blink_interval_s: tuple[float, float] = (2.0, 6.0)
        head_motion_px: float = Field(1.5, ge=0.0, le=8.0)
        seed: int | None = None  # every stream's blink and motion randomness; None: fresh per stream

        @model_validator(mode="after")
        def check_blink_interval(self) -> WarpLipSync.Settings:
            low, high = self.blink_interval_s
            if not 0.5 <= low <= high:
                raise ValueError("blink_interval_s must be (low, high) with 0.5 <= low <= high seconds")
            return self

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._rigs: dict[str, _AvatarRig] = {}
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        # Loads OpenCV's remap/affine kernels before the first session.
        image = np.zeros((64, 64, 3), np.uint8)
        grid = np.zeros((64, 64), np.float32)
        cv2.remap(image, grid, grid, cv2.INTER_LINEAR)
        cv2.warpAffine(image, np.eye(2, 3), (64, 64), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    def describe(self) -> dict[str, object]:
        return {
            "engine": "warp",
            "weights": "none: warps the avatar's own pixels",
            "threads": f"{cv2.getNumThreads()} (OpenCV's); a frame takes a few ms on one core",
            "look_ahead_frames": LOOK_AHEAD_FRAMES,
            "settings": self.settings.model_dump(),
        }

    def prepare(self, avatar: Avatar) -> None:
        self._rig(avatar)

    def open_stream(self, avatar: Avatar, fps: int, sample_rate: int) -> WarpLipSyncStream:
        if fps <= 0 or sample_rate <= 0 or sample_rate % fps:
            raise ValueError(f"sample_rate {sample_rate} must be a positive multiple of fps {fps}")
        return WarpLipSyncStream(self._rig(avatar), self.settings, fps, sample_rate)

    def _rig(self, avatar: Avatar) -> _AvatarRig:
        with self._lock:
            rig = self._rigs.get(avatar.source_hash)
            if rig is None:
                rig = self._rigs[avatar.source_hash] = _AvatarRig.build(avatar)
            return rig


# --- per-avatar precomputation ----------------------------------------------


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _saturate(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0)


@dataclass(frozen=True)
class _FaceLayout:
    """Where the features are, relative to the face box, so one detection serves every frame of a video."""

    lip_x: np.ndarray  # columns along the lips, in face widths from the mouth centre
    lip_rows: np.ndarray  # first row below the lips' meeting line there, in face heights from the box top
    teeth_visible: bool
    eyes: tuple[tuple[float, float], tuple[float, float]]  # centres in face widths/heights from the box corner

    @staticmethod
    def detect(frame: np.ndarray, box: FaceBox) -> _FaceLayout:
        xs, rows, teeth = _find_lip_line(frame, box)
        eyes = tuple(((x - box.x0) / box.width, (y - box.y0) / box.height) for x, y in _find_eyes(frame, box))
        return _FaceLayout(xs / box.width, (rows - box.y0) / box.height, teeth, eyes)  # type: ignore[arg-type]

    def lip_line(self, box: FaceBox, columns: np.ndarray) -> np.ndarray:
        """First row below the lips at ``columns`` (px from the mouth centre) for this frame's box."""
        return box.y0 + box.height * np.interp(columns / box.width, self.lip_x, self.lip_rows)


def _skin_tone(frame: np.ndarray, box: FaceBox) -> np.ndarray:
    """Median BGR of both cheeks."""
    y0, y1 = int(box.y0 + 0.58 * box.height), int(box.y0 + 0.68 * box.height)
    patches = [
        frame[y0:y1, int(box.x0 + fx * box.width) : int(box.x0 + (fx + 0.08) * box.width)].reshape(-1, 3)
        for fx in (0.18, 0.74)
    ]
    return np.median(np.concatenate(patches), axis=0).astype(np.float32)


def _smooth_profile(rows: np.ndarray) -> np.ndarray:
    """Median then Gaussian along a per-column row profile: single-column outliers must not ripple the warp."""
    line = cv2.medianBlur(rows.astype(np.float32).reshape(1, -1), 5)
    return cv2.GaussianBlur(line, (0, 0), sigmaX=3.0, borderType=cv2.BORDER_REPLICATE).ravel().astype(np.float64)


def _find_lip_line(frame: np.ndarray, box: FaceBox) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per column across the mouth (px from its centre): the first row below where the lips meet (for
    a smile: below the upper teeth and the dark mouth corners), and whether teeth show."""
    mx, my = box.mouth_center
    half = MOUTH_HALF_WIDTH * box.mouth_width
    x0, x1 = max(int(mx - 1.1 * half), 0), min(int(mx + 1.1 * half) + 1, frame.shape[1])
    y0, y1 = max(int(my - 0.06 * box.height), 0), min(int(my + 0.11 * box.height) + 1, frame.shape[0])
    crop = frame[y0:y1, x0:x1]
    xs = np.arange(x0, x1, dtype=np.float64) - mx
    skin = cv2.cvtColor(_skin_tone(frame, box).astype(np.uint8).reshape(1, 1, 3), cv2.COLOR_BGR2HSV)[0, 0]
    hsv = cv2.cvtColor(crop, cv2.COLOR_BGR2HSV).astype(np.float32)
    teeth = (hsv[..., 1] < 0.65 * skin[1]) & (hsv[..., 2] > 0.92 * skin[2])
    count, labels, stats, _ = cv2.connectedComponentsWithStats(teeth.astype(np.uint8), connectivity=8)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if count > 1 else 0
    if biggest and stats[biggest, cv2.CC_STAT_WIDTH] >= 0.4 * half and stats[biggest, cv2.CC_STAT_HEIGHT] >= 3:
        # Below the teeth, and below the dark gaps at the corners, near a parabola through the teeth's bottom.
        member = labels == biggest
        columns = np.flatnonzero(member.any(axis=0))
        bottoms = member.shape[0] - 1 - np.argmax(member[::-1, columns], axis=0)
        design = np.stack([np.ones(len(columns)), (xs[columns] / half) ** 2], axis=1)
        (centre, curve), *_ = np.linalg.lstsq(design, bottoms.astype(np.float64), rcond=None)
        prior = centre + min(curve, 0.0) * (xs / half) ** 2
        opening = member | (hsv[..., 2] < 0.7 * skin[2])
        band = np.arange(crop.shape[0])[:, None]
        opening &= (band >= prior - 0.08 * box.height) & (band <= prior + 2.0)
        found = opening.any(axis=0)
        lowest = opening.shape[0] - 1 - np.argmax(opening[::-1], axis=0)
        # a tooth darker than the threshold must not notch the line: take the lowest of nearby columns
        rows = cv2.dilate(np.where(found, lowest, np.round(prior)).astype(np.float32).reshape(1, -1), np.ones((1, 9)))
        rows, visible = rows.ravel(), True
    else:
        # Closed lips: the darkest row of each column is where they meet.
        gray = cv2.GaussianBlur(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32), (5, 3), 0)
        rows, visible = np.argmin(gray, axis=0), False
    return xs, y0 + 1.0 + _smooth_profile(rows), visible


def _find_eyes(frame: np.ndarray, box: FaceBox) -> tuple[tuple[float, float], tuple[float, float]]:
    """Eye centres from OpenCV's eye cascade near where the face box puts them; its guess where none is found."""
    top = frame[box.y0 : box.y0 + int(0.6 * box.height), box.x0 : box.x1]
    gray = cv2.equalizeHist(cv2.cvtColor(top, cv2.COLOR_BGR2GRAY))
    side = int(0.12 * box.width)
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_eye.xml")
    found = cascade.detectMultiScale(gray, 1.05, 4, minSize=(side, side), maxSize=(3 * side, 3 * side))
    centres = [(box.x0 + x + w / 2.0, box.y0 + y + h / 2.0) for x, y, w, h in found]
    chosen = []
    for gx, gy in box.eye_centers:
        near = [c for c in centres if math.hypot(c[0] - gx, c[1] - gy) < 0.12 * box.width]
        chosen.append(min(near, key=lambda c: math.hypot(c[0] - gx, c[1] - gy)) if near else (gx, gy))
    return chosen[0], chosen[1]


@dataclass(frozen=True)
class _MouthTemplates:
    """Per-pixel weights of the jaw warp over a region around the lips (ROI coordinates).

    ``centre`` is the ROI pixel of the lip line's centre (first row below the line).
    """

    centre: tuple[int, int]
    grid_x: np.ndarray
    grid_y: np.ndarray
    below: np.ndarray  # rows below the lip line (pixel centres), negative above
    jaw: np.ndarray  # how far each pixel below the line follows the jaw, given the lips' full share
    cheek_ramp: np.ndarray  # beside the opening: share of the jaw drop growing downwards
    lift: np.ndarray  # upper-lip rise profile, 0 below the line
    pucker: np.ndarray  # horizontal squeeze per unit of rounding
    columns: np.ndarray  # (1, W): x from the mouth centre
    half_width: float
    face_height: float
    rise: float  # px the lip line climbs towards the corners

    @staticmethod
    def build(box: FaceBox, layout: _FaceLayout) -> _MouthTemplates:
        w, h = box.width, box.height
        half = MOUTH_HALF_WIDTH * box.mouth_width
        left = int(math.ceil(0.6 * w))
        columns = np.arange(-left, left + 1, dtype=np.float32)[None, :]
        line = layout.lip_line(box, columns)
        line -= math.floor(float(layout.lip_line(box, np.zeros(1))[0]) + 0.5)
        rise = max(0.0, -float(line.min()))
        above = int(math.ceil(ROI_ABOVE_H * h + rise))
        below_px = int(math.ceil((CHIN_H + NECK_FALLOFF_H + 0.02) * h))
        ys, xs = np.mgrid[0 : above + below_px, 0 : 2 * left + 1].astype(np.float32)
        below = ys - above + 0.5 - line
        side = 1.0 - _smoothstep(JAW_FULL_W * w, JAW_NONE_W * w, np.abs(columns))
        neck = 1.0 - _smoothstep(CHIN_H * h, (CHIN_H + NECK_FALLOFF_H) * h, below)
        lower = below > 0
        jaw = np.where(lower, side * neck, 0.0)
        cheek_ramp = _smoothstep(0.0, CHEEK_RAMP_H * h, below)
        lift = np.where(lower, 0.0, 1.0 - _smoothstep(0.0, UPPER_LIFT_H * h, -below))
        # compact support: every displacement must be zero at the region's border, or pasting it leaves a seam
        reach = np.where(below < 0, -below / (PUCKER_ABOVE_H * h), below / (PUCKER_BELOW_H * h))
        pucker = columns * (1.0 - _smoothstep(0.0, 1.0, reach)) * (1.0 - _smoothstep(0.0, 2.2 * half, np.abs(columns)))
        f32 = np.float32
        return _MouthTemplates(
            centre=(left, above),
            grid_x=xs,
            grid_y=ys,
            below=below.astype(f32),
            jaw=jaw.astype(f32),
            cheek_ramp=cheek_ramp.astype(f32),
            lift=lift.astype(f32),
            pucker=pucker.astype(f32),
            columns=columns.astype(f32),
            half_width=half,
            face_height=float(h),
            rise=rise,
        )


@dataclass(frozen=True)
class _EyeRig:
    """One eye: where to paste, the closed lid to blend in, and the lid's path (ROI coordinates)."""

    origin: tuple[int, int]
    closed: np.ndarray  # float32 BGR: the eye region with the eye inpainted by skin
    lash_color: np.ndarray
    ellipse: np.ndarray  # feathered eye area
    rows: np.ndarray  # (H, 1) pixel rows
    top: np.ndarray  # (1, W) upper lid edge when open
    bottom: np.ndarray  # (1, W) where the lid edge rests when closed
    lash_fade: np.ndarray  # (1, W) the lash line thins towards the corners

    @staticmethod
    def build(frame: np.ndarray, centre: tuple[float, float], box: FaceBox) -> _EyeRig:
        # (ax, ay): the eye opening's semi-axes; the lid covers a taller ellipse so the upper lashes go too.
        ax, ay = 0.5 * EYE_W * box.width, 0.5 * EYE_H * box.height
        cover_x, cover_y, lift = ax + 2.0, 1.35 * ay, 0.2 * ay
        half_w, half_h = int(math.ceil(cover_x + 6)), int(math.ceil(cover_y + lift + 6))
        cx, cy = int(round(centre[0])), int(round(centre[1]))
        x0, y0 = max(cx - half_w, 0), max(cy - half_h, 0)
        x1, y1 = min(cx + half_w + 1, frame.shape[1]), min(cy + half_h + 1, frame.shape[0])
        region = frame[y0:y1, x0:x1]
        ex, ey = centre[0] - x0, centre[1] - y0

        hole = np.zeros(region.shape[:2], np.uint8)
        axes = (int(math.ceil(cover_x + 1)), int(math.ceil(cover_y + 1)))
        cv2.ellipse(hole, (int(round(ex)), int(round(ey - lift))), axes, 0, 0, 360, 255, -1)
        closed = cv2.inpaint(region, hole, 5, cv2.INPAINT_TELEA)
        closed = np.where(hole[..., None] > 0, cv2.GaussianBlur(closed, (5, 5), 0), closed)

        rows, cols = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32)
        arc = np.sqrt(_saturate(1.0 - ((cols[:1] - ex) / ax) ** 2))
        inside = ((cols - ex) / cover_x) ** 2 + ((rows - ey + lift) / cover_y) ** 2
        ellipse = _saturate((1.0 - inside) * 3.0)
        gray = cv2.cvtColor(region, cv2.COLOR_BGR2GRAY)
        dark = gray <= np.percentile(gray[hole > 0], 8)
        return _EyeRig(
            origin=(x0, y0),
            closed=closed.astype(np.float32),
            lash_color=region[dark].mean(axis=0).astype(np.float32),
            ellipse=ellipse.astype(np.float32),
            rows=rows[:, :1],
            top=(ey - ay * arc).astype(np.float32),
            bottom=(ey + 0.8 * ay * arc).astype(np.float32),
            lash_fade=_smoothstep(0.0, 0.6, arc).astype(np.float32),
        )

    def apply(self, frame: np.ndarray, closure: float) -> None:
        """Blend the lid down to ``closure`` (0 open, 1 shut) into ``frame`` in place."""
        x0, y0 = self.origin
        h, w = self.closed.shape[:2]
        target = frame[y0 : y0 + h, x0 : x0 + w]
        edge = self.top + closure * (self.bottom - self.top)
        above_edge = edge - self.rows
        cover = (self.ellipse * _saturate(above_edge / 1.5 + 0.5))[..., None]
        # the lid curves away from the light towards its edge, then the lashes
        shade = 1.0 - (0.12 * self.lash_fade * np.exp(-((above_edge / 3.0) ** 2)))[..., None]
        lash = (0.7 * math.sqrt(closure) * self.lash_fade * np.exp(-((above_edge / 1.0) ** 2)))[..., None]
        mixed = target.astype(np.float32) * (1.0 - cover) + self.closed * shade * cover
        target[:] = np.clip(mixed * (1.0 - lash) + self.lash_color * lash + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _FramePlan:
    """Everything one base frame of the avatar needs at render time."""

    image: np.ndarray
    mouth: _MouthTemplates
    mouth_origin: tuple[int, int]
    eyes: tuple[_EyeRig, _EyeRig]
    pivot: tuple[float, float]
    face_height: float


@dataclass(frozen=True)
class _MouthPose:
    openness: float  # 0 closed .. 1 fully open
    shape: float  # -1 rounded ('oo') .. 1 spread ('ee')

    @property
    def at_rest(self) -> bool:
        return self.openness <= MOUTH_SHUT and abs(self.shape) <= MOUTH_SHUT


@dataclass(frozen=True)
class _AvatarRig:
    plans: tuple[_FramePlan, ...]
    interior: np.ndarray  # BGR of the mouth's dark inside
    tongue: np.ndarray
    teeth: np.ndarray | None  # painted only when the photo shows none

    @staticmethod
    def build(avatar: Avatar) -> _AvatarRig:
        first, first_box = avatar.frames[0], avatar.face_boxes[0]
        layout = _FaceLayout.detect(first, first_box)
        templates: dict[tuple[int, int], _MouthTemplates] = {}
        plans = []
        for frame, box in zip(avatar.frames, avatar.face_boxes, strict=True):
            key = (box.width, box.height)
            if key not in templates:
                templates[key] = _MouthTemplates.build(box, layout)
            mouth = templates[key]
            mx = math.floor(box.mouth_center[0] + 0.5)
            lip_row = math.floor(float(layout.lip_line(box, np.zeros(1))[0]) + 0.5)
            eyes = tuple(
                _EyeRig.build(frame, (box.x0 + ex * box.width, box.y0 + ey * box.height), box) for ex, ey in layout.eyes
            )
            pivot = (box.center[0], box.y1 + HEAD_PIVOT_BELOW_H * box.height)
            origin = (mx - mouth.centre[0], lip_row - mouth.centre[1])
            plans.append(_FramePlan(frame, mouth, origin, eyes, pivot, float(box.height)))  # type: ignore[arg-type]
        light = float(np.clip(_skin_tone(first, first_box).mean() / 190.0, 0.4, 1.3))
        return _AvatarRig(
            tuple(plans),
            np.array([24, 22, 50], np.float32) * light,
            np.array([80, 84, 158], np.float32) * light,
            None if layout.teeth_visible else np.array([178, 188, 198], np.float32) * light,
        )

    def frame_index_at(self, tick: int) -> int:
        """Base frame for a tick: a video avatar plays forwards then backwards so the loop never jumps."""
        count = len(self.plans)
        if count == 1:
            return 0
        phase = tick % (2 * count - 2)
        return phase if phase < count else 2 * count - 2 - phase

    def render(
        self, plan: _FramePlan, pose: _MouthPose, max_jaw_open: float, closure: float, motion: np.ndarray
    ) -> np.ndarray:
        frame = plan.image.copy()
        if not pose.at_rest:
            self._render_mouth(frame, plan, pose, max_jaw_open)
        if closure > 0.0:
            for eye in plan.eyes:
                eye.apply(frame, closure)
        height, width = frame.shape[:2]
        moved = cv2.warpAffine(frame, motion, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        moved.flags.writeable = False  # a still frame is handed out again: nobody may paint on it
        return moved

    def _render_mouth(self, frame: np.ndarray, plan: _FramePlan, pose: _MouthPose, max_jaw_open: float) -> None:
        t = plan.mouth
        ox, oy = plan.mouth_origin
        drop = pose.openness * max_jaw_open * t.face_height
        rounding, spreading = max(-pose.shape, 0.0), max(pose.shape, 0.0)
        width_scale = 1.0 - 0.22 * rounding + 0.10 * spreading
        lens = _saturate(1.0 - (t.columns / (t.half_width * width_scale)) ** 2) ** 0.75
        displacement = drop * (t.jaw * (lens + (1.0 - lens) * t.cheek_ramp) - UPPER_LIFT * lens * t.lift)
        squeeze = (0.22 * rounding - 0.10 * spreading) * min(1.0, 3.0 * pose.openness + 0.3)
        map_x = t.grid_x + (ox + squeeze * t.pucker) if squeeze else t.grid_x + ox
        map_y = t.grid_y + (oy - displacement)
        warped = cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if drop >= 0.3:
            reach = int(math.ceil(t.half_width * width_scale)) + 2
            rows = slice(max(t.centre[1] - int(math.ceil(t.rise)) - 2, 0), t.centre[1] + int(math.ceil(drop)) + 2)
            opening = (rows, slice(t.centre[0] - reach, t.centre[0] + reach + 1))
            self._paint_interior(warped[opening], t.below[opening], displacement[opening], drop)
        _paste(frame, warped, ox, oy)

    def _paint_interior(self, region: np.ndarray, below: np.ndarray, gap: np.ndarray, drop: float) -> None:
        """Fill the gap the jaw opened (where the upper lip would show twice) with the mouth's inside, in place."""
        alpha = _saturate(below / 1.2 + 0.5) * _saturate((gap - below) / 1.2 + 0.5) * _saturate(gap / 2.0)
        depth = _saturate(below / np.maximum(gap, 1.0))[..., None]
        color = self.interior * (0.55 + 0.6 * depth)
        tongue = 0.4 * _smoothstep(0.6, 1.0, depth) * min(1.0, max(drop - 4.0, 0.0) / 8.0)
        color = color + (self.tongue - color) * tongue
        if self.teeth is not None:
            # upper teeth: a band under the upper lip, only when wide open and away from the corners
            centre = _saturate((gap / drop - 0.4) / 0.4)[..., None]
            teeth = (1.0 - _smoothstep(0.12, 0.3, depth)) * centre * min(1.0, max(drop - 6.0, 0.0) / 6.0) * 0.7
            color = color + (self.teeth - color) * teeth
        blended = region.astype(np.float32) + (color - region) * alpha[..., None]
        region[:] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def _paste(frame: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    """Copy ``patch`` into ``frame`` with its corner at (x, y), clipped to the frame."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + patch.shape[1], w), min(y + patch.shape[0], h)
    if x1 > x0 and y1 > y0:
        frame[y0:y1, x0:x1] = patch[y0 - y : y1 - y, x0 - x : x1 - x]


# --- per-session stream -------------------------------------------------------


class _Segment:
    """Audio pushed for one segment and not yet rendered; pieces are joined once per pull, not per push."""

    def __init__(self, samples_per_frame: int) -> None:
        self.spf = samples_per_frame
        self.pieces: list[np.ndarray] = []
        self.pushed = 0
        self.ended = False

    def push(self, audio: np.ndarray) -> None:
        self.pieces.append(audio)
        self.pushed += len(audio)

    def end(self) -> None:
        """The last frame is padded with silence to a whole frame."""
        self.pieces.append(np.zeros(-self.pushed % self.spf, np.float32))
        self.ended = True

    def audio(self) -> np.ndarray:
        if len(self.pieces) != 1:
            self.pieces = [np.concatenate(self.pieces) if self.pieces else np.zeros(0, np.float32)]
        return self.pieces[0]


class _HeadMotion:
    """Smooth, never-repeating drift: per axis a sum of three slow sines with random frequencies and phases.
    A drift is (dx px, dy px, rotation in degrees about the pivot)."""

    def __init__(self, rng: np.random.Generator, amplitude_px: float, face_height: float, fps: int) -> None:
        self.frequencies = rng.uniform(*MOTION_FREQ_HZ, size=(3, 3)) * (2.0 * math.pi / fps)
        self.phases = rng.uniform(0.0, 2.0 * math.pi, size=(3, 3))
        weights = rng.uniform(0.5, 1.0, size=(3, 3))
        self.weights = weights / weights.sum(axis=1, keepdims=True)
        self.crown_radius = CROWN_ABOVE_PIVOT_H * face_height
        # the crown moves by about amplitude_px
        self.scale = np.array([amplitude_px, amplitude_px, math.degrees(amplitude_px / self.crown_radius)])

    def drift(self, tick: int) -> np.ndarray:
        return self.scale * (self.weights * np.sin(self.frequencies * tick + self.phases)).sum(axis=1)

    def distance_px(self, a: np.ndarray, b: np.ndarray) -> float:
        """How far apart two drifts put the crown, at most."""
        dx, dy, angle = a - b
        return math.hypot(dx, dy) + abs(math.radians(angle)) * self.crown_radius

    @staticmethod
    def matrix(drift: np.ndarray, pivot: tuple[float, float]) -> np.ndarray:
        dx, dy, angle = drift
        matrix = cv2.getRotationMatrix2D(pivot, float(angle), 1.0)
        matrix[:, 2] += (dx, dy)
        return matrix


class WarpLipSyncStream(SegmentedStream[_Segment]):
    """One session's mouth, blinks and head motion; its methods may be called from different threads."""

    def __init__(self, rig: _AvatarRig, settings: WarpLipSync.Settings, fps: int, sample_rate: int) -> None:
        super().__init__(lambda: _Segment(sample_rate // fps))
        self.rig = rig
        self.settings = settings
        self.fps = fps
        self.sample_rate = sample_rate
        self.samples_per_frame = sample_rate // fps
        self._rng = np.random.default_rng(settings.seed)
        self._motion = _HeadMotion(self._rng, settings.head_motion_px, rig.plans[0].face_height, fps)
        self._tick = 0
        self._shown_drift = self._motion.drift(0)  # the head as shown, as of _drift_tick
        self._drift_tick = 0
        self._still: tuple[tuple[object, ...], np.ndarray] | None = None  # the last frame and what it showed
        self._next_blink = self._blink_gap()  # the tick the next blink starts
        self._openness = 0.0
        self._shape = 0.0
        self._level_db = LEVEL_START_DB
        self._attack = 1.0 - math.exp(-1.0 / (fps * ATTACK_S))
        self._release = 1.0 - math.exp(-1.0 / (fps * RELEASE_S))
        self._level_decay = LEVEL_DECAY_DB_S / fps
        freqs = np.fft.rfftfreq(self.samples_per_frame, 1.0 / sample_rate)
        self._low_band = (freqs >= LOW_BAND_HZ[0]) & (freqs < LOW_BAND_HZ[1])
        self._high_band = (freqs >= HIGH_BAND_HZ[0]) & (freqs < HIGH_BAND_HZ[1])
        self._window = np.hanning(self.samples_per_frame).astype(np.float32)

    def pull(self) -> list[AVFrame]:
        with self._lock:
            return self._render_ready()

    def idle_frame(self, elapsed_frames: int = 1) -> np.ndarray:
        with self._lock:
            keep = (1.0 - self._release) ** elapsed_frames
            self._openness *= keep
            self._shape *= keep
            self._tick += elapsed_frames - 1
            return self._render(reuse_still=True)

    def clear(self) -> None:
        with self._lock:
            self._segments.clear()

    # --- as the base layer of another engine (Wav2Lip paints its mouth on these frames) -----------

    def upcoming_frames(self, count: int) -> list[int]:
        """Which avatar frame each of the next ``count`` ticks is based on."""
        return [self.rig.frame_index_at(self._tick + i) for i in range(count)]

    def painted_frame(self, paint: Callable[[np.ndarray, int], None], elapsed_frames: int = 1) -> np.ndarray:
        """The next tick with the mouth closed, ``paint(image, frame_index)`` applied to the avatar frame
        before blinks and head motion."""
        with self._lock:
            self._tick += elapsed_frames - 1
            index = self.rig.frame_index_at(self._tick)
            image = self.rig.plans[index].image.copy()
            paint(image, index)
            return self._render(replace(self.rig.plans[index], image=image), _MouthPose(0.0, 0.0))

    def _render_ready(self) -> list[AVFrame]:
        frames: list[AVFrame] = []
        spf = self.samples_per_frame
        for segment in self._segments.to_render():
            audio = segment.audio()
            available = len(audio) // spf
            ready = max(available if segment.ended else available - LOOK_AHEAD_FRAMES, 0)
            for k in range(ready):
                chunk = audio[k * spf : (k + 1) * spf]
                upcoming = audio[(k + 1) * spf : (k + 2) * spf] if k + 1 < available else None
                last = segment.ended and k == ready - 1
                frames.append(AVFrame(self._speech_frame(chunk, upcoming), chunk.copy(), True, last))
            if not segment.ended:
                segment.pieces = [audio[ready * spf :]]
        return frames

    # --- mouth from audio ---

    def _speech_frame(self, chunk: np.ndarray, upcoming: np.ndarray | None) -> np.ndarray:
        target, balance = self._features(chunk, track_level=True)
        if upcoming is not None:
            target = max(target, ANTICIPATION * self._features(upcoming, track_level=False)[0])
        rate = self._attack if target > self._openness else self._release
        self._openness += (target - self._openness) * rate
        voiced = min(1.0, 2.0 * target)
        shape_target = float(np.clip((balance - BALANCE_CENTRE_DB) / BALANCE_SPAN_DB, -1.0, 1.0)) * voiced
        self._shape += (shape_target - self._shape) * self._release
        return self._render()

    def _features(self, chunk: np.ndarray, *, track_level: bool) -> tuple[float, float]:
        """Mouth opening target (0..1) and spectral balance (dB, high band over low band) of one frame."""
        level = 10.0 * math.log10(float(np.dot(chunk, chunk)) / len(chunk) + 1e-12)
        if track_level:
            if level > self._level_db:
                self._level_db += 0.3 * (level - self._level_db)
            else:
                self._level_db = max(self._level_db - self._level_decay, LEVEL_MIN_DB)
        loudness = (level - (self._level_db - LEVEL_SPAN_DB)) / LEVEL_SPAN_DB
        power = np.abs(np.fft.rfft(chunk * self._window)) ** 2
        balance = 10.0 * math.log10((power[self._high_band].sum() + 1e-12) / (power[self._low_band].sum() + 1e-12))
        # a very dark spectrum is a nasal murmur ('m', 'n'), hummed with the lips (nearly) closed
        nasal = float(_smoothstep(NASAL_DB[0], NASAL_DB[1], np.float64(balance)))
        opening = min(1.0, self.settings.mouth_gain * max(loudness, 0.0) ** OPEN_CURVE) * (1.0 - 0.7 * nasal)
        return opening, balance

    # --- idle motion ---

    def _blink_gap(self) -> int:
        return int(round(self._rng.uniform(*self.settings.blink_interval_s) * self.fps))

    def _closure(self) -> float:
        """How closed the eyes are at this tick. Blinks are scheduled on the tick clock, not detected when a
        frame happens to be rendered, so idle video at a lower frame rate sees the same blinks at the same
        ticks as at the full rate."""
        blink_ticks = BLINK_TIMES_S[-1] * self.fps
        while self._tick - self._next_blink > blink_ticks:  # that blink is over: schedule the next
            self._next_blink += math.ceil(blink_ticks) + self._blink_gap()
        elapsed = (self._tick - self._next_blink) / self.fps
        if elapsed < 0:
            return 0.0
        return float(np.interp(elapsed, BLINK_TIMES_S, BLINK_CLOSURE))

    def _head_drift(self) -> np.ndarray:
        """The head as shown at this tick: it moves on only once the drift is a visible step away. Every
        tick is looked at, skipped or not, so the steps fall on the same ticks at any frame rate."""
        while self._drift_tick < self._tick:
            self._drift_tick += 1
            drift = self._motion.drift(self._drift_tick)
            if self._motion.distance_px(drift, self._shown_drift) > HEAD_STEP_PX:
                self._shown_drift = drift
        return self._shown_drift

    def _render(
        self, plan: _FramePlan | None = None, pose: _MouthPose | None = None, reuse_still: bool = False
    ) -> np.ndarray:
        """This tick's frame; with ``reuse_still``, the previous frame itself when it would look the same."""
        index = self.rig.frame_index_at(self._tick)
        plan = self.rig.plans[index] if plan is None else plan
        pose = _MouthPose(self._openness, self._shape) if pose is None else pose
        closure = self._closure()
        drift = self._head_drift()
        self._tick += 1
        looks = (index, None if pose.at_rest else pose, closure, drift.tobytes())
        if reuse_still and self._still is not None and self._still[0] == looks:
            return self._still[1]
        frame = self.rig.render(plan, pose, self.settings.max_jaw_open, closure, self._motion.matrix(drift, plan.pivot))
        # A painted frame (another engine's mouth on the base) is never the same as the next one.
        self._still = (looks, frame) if plan is self.rig.plans[index] else None
        return frame

"""The avatar cut out from its photo's background, for /obs over a chroma-green or transparent backdrop.

A photo has no green screen to key out, so the person is separated once per avatar with OpenCV's
GrabCut, seeded from the detected face: the face and the column below it are the person, the top
corners and the sides beside the head are background. The result is a soft-edged alpha mask the
page applies to every video frame. The face moves only a pixel or two (head motion, lip-sync), so
one mask per avatar fits every frame; a video avatar uses its first frame's mask.
"""

from __future__ import annotations

import cv2
import numpy as np

from engines.avatar import Avatar, FaceBox

WORK_SIDE = 256  # GrabCut on a small copy: fast, and the mask is feathered afterwards anyway
ITERATIONS = 5
FEATHER_PX = 3


def _seed(shape: tuple[int, int], face: FaceBox, scale: float) -> np.ndarray:
    height, width = shape
    seed = np.full((height, width), cv2.GC_PR_BGD, np.uint8)
    x0, y0, x1, y1 = (round(v * scale) for v in (face.x0, face.y0, face.x1, face.y1))
    face_w, face_h = x1 - x0, y1 - y0
    # Hair above the face, shoulders and body below it: probably the person.
    seed[max(0, y0 - face_h // 2) :, max(0, x0 - face_w) : min(width, x1 + face_w)] = cv2.GC_PR_FGD
    # Well beside and above the head: background for sure.
    head_top = max(0, y0 - face_h // 2)
    side = max(2, face_w // 4)
    seed[: head_top // 2 + 1, :] = cv2.GC_BGD
    seed[:y1, : max(0, x0 - face_w // 2 - side)] = cv2.GC_BGD
    seed[:y1, min(width, x1 + face_w // 2 + side) :] = cv2.GC_BGD
    # The face itself, and the neck and chest below it: the person for sure.
    inset_x, inset_y = face_w // 6, face_h // 8
    seed[y0 + inset_y : y1 - inset_y, x0 + inset_x : x1 - inset_x] = cv2.GC_FGD
    seed[y1:, x0 + face_w // 3 : x1 - face_w // 3] = cv2.GC_FGD
    return seed


def _largest_component(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return mask
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == largest).astype(np.uint8)


def person_alpha(frame: np.ndarray, face: FaceBox) -> np.ndarray:
    """uint8 alpha (255: the person) the size of ``frame``, with feathered edges."""
    height, width = frame.shape[:2]
    scale = WORK_SIDE / max(height, width)
    small = cv2.resize(
        frame, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
    )
    mask = _seed(small.shape[:2], face, scale)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(small, mask, None, background, foreground, ITERATIONS, cv2.GC_INIT_WITH_MASK)
    person = _largest_component(np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8))
    person = cv2.morphologyEx(person, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    alpha = cv2.resize(person.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    alpha = cv2.GaussianBlur(alpha, (0, 0), FEATHER_PX)
    return np.clip(alpha * 255.0, 0, 255).astype(np.uint8)


def mask_png(avatar: Avatar) -> bytes:
    """The avatar's cut-out as a white PNG whose alpha channel is the person (for canvas compositing)."""
    alpha = person_alpha(avatar.frames[0], avatar.face_boxes[0])
    rgba = np.dstack([np.full_like(alpha, 255)] * 3 + [alpha])
    ok, encoded = cv2.imencode(".png", rgba)
    if not ok:
        raise RuntimeError("PNG encoding of the avatar mask failed")
    return encoded.tobytes()

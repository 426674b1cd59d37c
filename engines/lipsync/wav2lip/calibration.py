"""Real Wav2Lip inputs to calibrate the int8 decoder on: face crops of an avatar photo and mel windows of speech.

The speech is shipped with the project as its mel windows (``calibration_mels.npz``, 64 windows of three
sentences spoken by espeak-ng in two accents and speeds), so calibrating needs no program beyond the
Python packages; ``media_server.testing.speech_corpus.calibration_mels`` made it and makes it again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from engines import PROJECT_ROOT
from engines.avatar import FaceBox, detect_face, read_source_frames
from engines.lipsync.wav2lip.backends.base import BackendError
from engines.lipsync.wav2lip.mel import MEL_WINDOW, mel_window_start, melspectrogram

DEFAULT_CALIBRATION_IMAGE = PROJECT_ROOT / "avatars" / "default" / "portrait.jpg"
CALIBRATION_MELS = Path(__file__).with_name("calibration_mels.npz")
CALIBRATION_FRAMES = 64
FACE_SIZE = 96


@dataclass(frozen=True)
class Calibration:
    """Real generator inputs: face inputs (N, 6, 96, 96) and mel windows (M, 1, 80, 16), float32.

    Calibration frame k pairs mel window k with face k % N.
    """

    faces: np.ndarray
    mels: np.ndarray

    def digest(self) -> str:
        digest = hashlib.sha256()
        for array in (self.faces, self.mels):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        return digest.hexdigest()


# --- real inputs ---------------------------------------------------------------------------------------


def face_inputs(crops_bgr: list[np.ndarray]) -> np.ndarray:
    """Generator face inputs from 96x96 BGR uint8 crops: the crop with its lower half masked, then itself
    as the reference (a still avatar's reference is its own frame)."""
    faces = np.stack(crops_bgr).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    masked = faces.copy()
    masked[:, :, FACE_SIZE // 2 :] = 0.0
    return np.concatenate((masked, faces), axis=1)


def jittered_face_crops(frame: np.ndarray, box: FaceBox, count: int, seed: int) -> list[np.ndarray]:
    """``count`` 96x96 crops of the face in ``box``, shifted and scaled by a few percent the way detection
    jitter and head motion move it, so calibration sees more than one exact crop."""
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        scale = rng.uniform(0.95, 1.08)
        cx = box.center[0] + rng.uniform(-0.04, 0.04) * box.width
        cy = box.center[1] + rng.uniform(-0.02, 0.06) * box.height  # Wav2Lip crops reach below the chin
        half_w, half_h = box.width * scale / 2, box.height * scale * 1.1 / 2
        x0, x1 = int(max(0, cx - half_w)), int(min(frame.shape[1], cx + half_w))
        y0, y1 = int(max(0, cy - half_h)), int(min(frame.shape[0], cy + half_h))
        crops.append(cv2.resize(frame[y0:y1, x0:x1], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_AREA))
    return crops


def photo_face_crops(image_path: Path, count: int, seed: int) -> list[np.ndarray]:
    frame = read_source_frames(image_path)[0]
    return jittered_face_crops(frame, detect_face(frame), count, seed)


def speech_mel_windows(clips: list[np.ndarray]) -> np.ndarray:
    """Every 25 fps frame's mel window of ``clips`` (float32 mono at 16 kHz): (M, 1, 80, 16) float32."""
    windows = []
    for audio in clips:
        mel = melspectrogram(audio)
        frame = 0
        while mel_window_start(frame) + MEL_WINDOW <= mel.shape[1]:
            start = mel_window_start(frame)
            windows.append(mel[:, start : start + MEL_WINDOW])
            frame += 1
    return np.stack(windows)[:, None].astype(np.float32)


def shipped_speech_mels() -> np.ndarray:
    """The calibration speech's mel windows, (64, 1, 80, 16) float32."""
    with np.load(CALIBRATION_MELS) as data:
        return data["mels"].astype(np.float32)


def default_calibration(image_path: Path = DEFAULT_CALIBRATION_IMAGE) -> Calibration:
    """Face crops of ``image_path`` (made on the spot, deterministic) and the shipped speech."""
    if not image_path.is_file():
        raise BackendError(f"int8 calibration needs a face photo, and {image_path} does not exist")
    return Calibration(face_inputs(photo_face_crops(image_path, 8, seed=0)), shipped_speech_mels())

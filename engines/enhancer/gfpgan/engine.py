"""GFPGAN v1.4 face restoration for the Wav2Lip mouth: the generator's 96x96 face, upscaled to the
avatar's face, is blurry; GFPGAN redraws it with skin, teeth and lip detail.

The weights are fetched by hand (`facecast models fetch gfpgan`); GFPGAN's code is Apache-2.0 and its
weights were trained on FFHQ, whose licence (CC BY-NC-SA 4.0) is non-commercial: check it fits
your use. It restores each speaking frame, which takes a GPU or Gaudi to keep up with live video;
a CPU takes seconds per face (``describe()`` reports what warm-up measured, docs/benchmarks.md
the figure on the project's 2-core machine), so on a CPU-only server leave it off for live sessions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from engines import PROJECT_ROOT
from engines.base import EngineConfigError, EngineSettings, FaceEnhancer
from engines.device import DeviceChoice, pick_device
from engines.enhancer.gfpgan.model import GFPGAN, GFPGANConfig

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = PROJECT_ROOT / "models" / "GFPGANv1.4.pth"
FACE_SIZE = 512


class GFPGANEnhancer(FaceEnhancer):
    class Settings(EngineSettings):
        checkpoint: Path | None = None  # GFPGANv1.4.pth; None: DEFAULT_CHECKPOINT
        device: str = "auto"  # "auto" picks hpu, then cuda, then cpu

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.checkpoint = (settings.checkpoint or DEFAULT_CHECKPOINT).expanduser()
        if not self.checkpoint.is_file():
            where = (
                f"enhancer.checkpoint = {str(self.checkpoint)!r} does not exist"
                if settings.checkpoint is not None
                else f"enhancer.checkpoint is not set and the default {self.checkpoint} does not exist"
            )
            raise EngineConfigError(
                f"the gfpgan face enhancer needs the GFPGAN v1.4 weights, but {where}. Download them with "
                "`facecast models fetch gfpgan` on a machine with internet access, or remove the [enhancer] section"
            )
        self.device: DeviceChoice = pick_device(settings.device)
        self.model = load_gfpgan(self.checkpoint).to(self.device.device).eval()
        self.warm_up_ms: float | None = None

    def enhance(self, face_bgr: np.ndarray) -> np.ndarray:
        height, width = face_bgr.shape[:2]
        square = cv2.resize(face_bgr, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_CUBIC)
        rgb = torch.from_numpy(np.ascontiguousarray(square[..., ::-1])).to(self.device.device)
        faces = rgb.permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.inference_mode():
            restored = self.model(faces).clamp_(-1.0, 1.0)
        pixels = ((restored[0].permute(1, 2, 0) + 1.0) * 127.5).round().byte().cpu().numpy()[..., ::-1]
        return cv2.resize(np.ascontiguousarray(pixels), (width, height), interpolation=cv2.INTER_AREA)

    def warm_up(self) -> None:
        started = time.perf_counter()
        self.enhance(np.zeros((FACE_SIZE, FACE_SIZE, 3), np.uint8))
        self.warm_up_ms = round((time.perf_counter() - started) * 1000, 1)
        log.info(
            "gfpgan: one face in %.0f ms on %s, at most %.1f speaking frames per second",
            self.warm_up_ms,
            self.device.device,
            1000 / self.warm_up_ms,
        )

    def describe(self) -> dict[str, object]:
        return {
            "checkpoint": str(self.checkpoint),
            "device": self.device.device,
            "device_why": self.device.reason,
            "ms_per_face_at_warm_up": self.warm_up_ms,
            "licence": "GFPGAN code Apache-2.0; weights trained on FFHQ (CC BY-NC-SA 4.0, non-commercial)",
        }


def load_gfpgan(path: Path) -> GFPGAN:
    """GFPGANv1.4's ``params_ema`` (or ``params``) in the project's model, every name and shape checked."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises assorted types for files that are not checkpoints
        raise EngineConfigError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
    weights = (
        checkpoint.get("params_ema", checkpoint.get("params", checkpoint)) if isinstance(checkpoint, dict) else None
    )
    if not isinstance(weights, dict):
        raise EngineConfigError(f"{path} holds no GFPGAN weights (expected a dict with 'params_ema')")
    model = GFPGAN(GFPGANConfig())
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise EngineConfigError(
            f"{path} is not a GFPGAN v1.4 (clean architecture) checkpoint: {str(error)[:400]}"
        ) from error
    return model

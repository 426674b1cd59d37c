"""Where the Wav2Lip generator runs. Every backend computes the same thing:

* ``encode_faces(faces)``: (N, 6, 96, 96) float32 in [0, 1] -> opaque per-face features
  (computed once per avatar frame and cached by the engine);
* ``generate(mels, features, index)``: mels (B, 1, 80, 16) float32 and, for each of the B frames,
  the index of its face in ``features`` -> (B, 3, 96, 96) float32 in [0, 1], BGR.

The torch backend (``cpu`` float32 eager: the reference; or ``cuda``) lives here; faster or
device-specific ones live in their own modules and are picked by name with ``create_backend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from engines.wav2lip_model import Wav2LipGenerator


class Wav2LipBackend(ABC):
    name: str

    @abstractmethod
    def encode_faces(self, faces: np.ndarray) -> object: ...

    @abstractmethod
    def generate(self, mels: np.ndarray, features: object, index: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, object]:
        return {"backend": self.name}


class TorchBackend(Wav2LipBackend):
    """PyTorch eager float32 on ``cpu`` (the reference) or ``cuda``."""

    def __init__(self, model: Wav2LipGenerator, device: str = "cpu") -> None:
        self.name = f"torch-{device}"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def encode_faces(self, faces: np.ndarray) -> list[torch.Tensor]:
        return self.model.encode_faces(torch.from_numpy(faces).to(self.device))

    @torch.inference_mode()
    def generate(self, mels: np.ndarray, features: list[torch.Tensor], index: np.ndarray) -> np.ndarray:
        picked = [feature[torch.from_numpy(index).to(self.device)] for feature in features]
        out = self.model.decode(torch.from_numpy(mels).to(self.device), picked)
        return out.float().cpu().numpy()

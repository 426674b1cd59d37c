"""PyTorch eager float32: the reference on the CPU, and the CUDA path."""

from __future__ import annotations

import numpy as np
import torch

from engines.lipsync.wav2lip.backends.base import Wav2LipBackend
from engines.lipsync.wav2lip.model import Wav2LipGenerator


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

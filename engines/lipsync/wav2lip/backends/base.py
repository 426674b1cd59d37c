"""What every Wav2Lip backend computes, and the generator's graphs that exporters capture.

* ``encode_faces(faces)``: (N, 6, 96, 96) float32 in [0, 1] -> opaque per-face features
  (computed once per avatar frame and cached by the engine);
* ``generate(mels, features, index)``: mels (B, 1, 80, 16) float32 and, for each of the B frames,
  the index of its face in ``features`` -> (B, 3, 96, 96) float32 in [0, 1], BGR.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from engines.lipsync.wav2lip.model import Wav2LipGenerator

SKIP_NAMES = tuple(f"skip{i}" for i in range(7))  # the face encoder's outputs, shallowest (96x96) first


class BackendError(ValueError):
    """A backend name or device that cannot be used here; the message says why."""


class Wav2LipBackend(ABC):
    name: str

    @abstractmethod
    def encode_faces(self, faces: np.ndarray) -> object: ...

    @abstractmethod
    def generate(self, mels: np.ndarray, features: object, index: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, object]:
        return {"backend": self.name}


class FaceEncoderGraph(torch.nn.Module):
    """``encode_faces`` as a module with tensor outputs: what ONNX export and HPU graphs capture."""

    def __init__(self, model: Wav2LipGenerator) -> None:
        super().__init__()
        self.model = model

    def forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.encode_faces(faces))


class DecoderGraph(torch.nn.Module):
    """``decode`` with one named input per face feature (graph exporters take no lists)."""

    def __init__(self, model: Wav2LipGenerator) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        mels: torch.Tensor,
        skip0: torch.Tensor,
        skip1: torch.Tensor,
        skip2: torch.Tensor,
        skip3: torch.Tensor,
        skip4: torch.Tensor,
        skip5: torch.Tensor,
        skip6: torch.Tensor,
    ) -> torch.Tensor:
        return self.model.decode(mels, [skip0, skip1, skip2, skip3, skip4, skip5, skip6])

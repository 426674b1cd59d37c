"""Where the Wav2Lip generator runs. Every backend computes the same thing:

* ``encode_faces(faces)``: (N, 6, 96, 96) float32 in [0, 1] -> opaque per-face features
  (computed once per avatar frame and cached by the engine);
* ``generate(mels, features, index)``: mels (B, 1, 80, 16) float32 and, for each of the B frames,
  the index of its face in ``features`` -> (B, 3, 96, 96) float32 in [0, 1], BGR.

The torch backend (``cpu`` float32 eager: the reference; or ``cuda``) lives here; faster or
device-specific ones live in their own modules (``wav2lip_onnx``, ``wav2lip_hpu``), imported only
when picked by name with ``create_backend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engines.wav2lip_model import Wav2LipGenerator

if TYPE_CHECKING:
    from engines.wav2lip_onnx import Calibration

BACKENDS = ("torch", "onnx", "onnx-int8", "hpu")
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


def create_backend(
    name: str,
    model: Wav2LipGenerator,
    device: str = "cpu",
    *,
    threads: int = 2,
    cache_dir: Path | None = None,
    calibration: Calibration | None = None,
) -> Wav2LipBackend:
    """The backend called ``name`` (one of BACKENDS) running ``model``.

    "torch" runs on ``device`` "cpu" or "cuda"; the ONNX backends on "cpu" only, with ``threads`` intra-op
    threads, keeping their exported models under ``cache_dir``; "onnx-int8" is calibrated on ``calibration``
    or, when None, on the default avatar's face and espeak-ng speech; "hpu" needs a Gaudi host.
    """
    if name == "torch":
        if device not in ("cpu", "cuda"):
            raise BackendError(f"the torch backend runs on 'cpu' or 'cuda', not {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("device 'cuda' was asked for but torch sees no CUDA device")
        return TorchBackend(model, device)
    if name in ("onnx", "onnx-int8"):
        if device != "cpu":
            raise BackendError(f"the {name} backend runs on the CPU, not {device!r}: use 'torch' for cuda")
        from engines.wav2lip_onnx import create_onnx_backend

        return create_onnx_backend(
            model, quantized=name == "onnx-int8", threads=threads, cache_dir=cache_dir, calibration=calibration
        )
    if name == "hpu":
        if device != "hpu":
            raise BackendError(f"the hpu backend runs on device 'hpu', not {device!r}")
        from engines.wav2lip_hpu import HpuBackend

        return HpuBackend(model)
    raise BackendError(f"unknown Wav2Lip backend {name!r}: choose one of {', '.join(BACKENDS)}")

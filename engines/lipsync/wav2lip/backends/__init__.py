"""Where the Wav2Lip generator runs, picked by name: ``torch`` (eager float32 on ``cpu``, the reference, or
``cuda``), ``onnx`` and ``onnx-int8`` (the CPU's fast paths), ``hpu`` (Gaudi). Each lives in its own module,
imported only when picked; all of them implement ``backends.base.Wav2LipBackend``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engines.lipsync.wav2lip.backends.base import BackendError, Wav2LipBackend
from engines.lipsync.wav2lip.model import Wav2LipGenerator

if TYPE_CHECKING:
    from engines.lipsync.wav2lip.calibration import Calibration

BACKENDS = ("torch", "onnx", "onnx-int8", "hpu")


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
        from engines.lipsync.wav2lip.backends.pytorch import TorchBackend

        return TorchBackend(model, device)
    if name in ("onnx", "onnx-int8"):
        if device != "cpu":
            raise BackendError(f"the {name} backend runs on the CPU, not {device!r}: use 'torch' for cuda")
        from engines.lipsync.wav2lip.backends.onnx import create_onnx_backend

        return create_onnx_backend(
            model, quantized=name == "onnx-int8", threads=threads, cache_dir=cache_dir, calibration=calibration
        )
    if name == "hpu":
        if device != "hpu":
            raise BackendError(f"the hpu backend runs on device 'hpu', not {device!r}")
        from engines.lipsync.wav2lip.backends.hpu import HpuBackend

        return HpuBackend(model)
    raise BackendError(f"unknown Wav2Lip backend {name!r}: choose one of {', '.join(BACKENDS)}")

"""Wav2Lip on Intel Gaudi (HPU), following Habana's inference practice.

* Static shapes: every call is padded to a fixed batch size, so the graph compiler sees one decoder
  shape and one encoder shape, each compiled once.
* HPU graphs (``wrap_in_hpu_graph``) replay the recorded launch sequence, taking the host out of the loop.
* bf16 autocast for the convolutions; outputs come back as float32.
* Warm-up runs each shape once at construction, so the first real frame does not pay for compilation.

Runs only where ``habana_frameworks`` (the Gaudi software stack's PyTorch bridge) is installed; nowhere
else is this code executed, so it is kept small.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch

from engines.lipsync.wav2lip.backends.base import BackendError, DecoderGraph, FaceEncoderGraph, Wav2LipBackend
from engines.lipsync.wav2lip.mel import MEL_WINDOW
from engines.lipsync.wav2lip.model import Wav2LipGenerator

BATCH_SIZE = 16  # frames per decoder call; larger batches are split, smaller ones padded
FACE_SIZE = 96


def _habana() -> ModuleType:
    try:
        import habana_frameworks.torch as habana
        import habana_frameworks.torch.core  # noqa: F401 - registers the "hpu" device with torch
    except ImportError as error:
        raise BackendError(
            "the hpu backend needs an Intel Gaudi host with the Habana PyTorch bridge (habana_frameworks) "
            f"installed; it is not importable here ({error}). Use backend 'torch' or 'onnx-int8' on this machine."
        ) from error
    return habana


def _padded(array: np.ndarray, size: int) -> np.ndarray:
    if len(array) == size:
        return array
    padding = np.zeros((size - len(array), *array.shape[1:]), dtype=array.dtype)
    return np.concatenate((array, padding))


class HpuBackend(Wav2LipBackend):
    """Features stay on the HPU as the encoder's seven bf16 tensors, one row per face."""

    name = "hpu"

    def __init__(self, model: Wav2LipGenerator, batch_size: int = BATCH_SIZE) -> None:
        habana = _habana()
        self.batch_size = batch_size
        self.device = torch.device("hpu")
        model = model.to(self.device).eval()
        self._encoder = habana.hpu.wrap_in_hpu_graph(FaceEncoderGraph(model))
        self._decoder = habana.hpu.wrap_in_hpu_graph(DecoderGraph(model))
        self._warm_up()

    def _warm_up(self) -> None:
        features = self.encode_faces(np.zeros((1, 6, FACE_SIZE, FACE_SIZE), np.float32))
        self.generate(np.zeros((1, 1, 80, MEL_WINDOW), np.float32), features, np.zeros(1, np.int64))

    @torch.inference_mode()
    def encode_faces(self, faces: np.ndarray) -> list[torch.Tensor]:
        chunks = []
        for start in range(0, len(faces), self.batch_size):
            batch = faces[start : start + self.batch_size]
            inputs = torch.from_numpy(_padded(batch, self.batch_size)).to(self.device)
            with torch.autocast(device_type="hpu", dtype=torch.bfloat16):
                outputs = self._encoder(inputs)
            chunks.append([output[: len(batch)] for output in outputs])
        return [torch.cat(parts) for parts in zip(*chunks)]

    @torch.inference_mode()
    def generate(self, mels: np.ndarray, features: list[torch.Tensor], index: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(mels), self.batch_size):
            count = min(self.batch_size, len(mels) - start)
            batch_mels = torch.from_numpy(_padded(mels[start : start + count], self.batch_size)).to(self.device)
            rows = torch.from_numpy(_padded(index[start : start + count], self.batch_size)).to(self.device)
            skips = [feature.index_select(0, rows) for feature in features]
            with torch.autocast(device_type="hpu", dtype=torch.bfloat16):
                out = self._decoder(batch_mels, *skips)
            outputs.append(out[:count].float().cpu().numpy())
        return np.concatenate(outputs)

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "device": "hpu", "batch_size": self.batch_size, "precision": "bf16 autocast"}

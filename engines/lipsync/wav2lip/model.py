"""The Wav2Lip generator (Prajwal et al., ACM MM 2020), state-dict compatible with the public checkpoints.

A U-Net: the face encoder downsamples a 6-channel 96x96 input (lower-half-masked target + reference)
to a 512x1x1 code, the audio encoder maps one 80x16 mel window to a 512x1x1 embedding, and the decoder
upsamples that embedding back to 96x96, concatenating the matching encoder feature map at every scale.
Module and attribute names follow the published model so ``wav2lip.pth`` / ``wav2lip_gan.pth`` load as-is.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

CHECKPOINT_PREFIX = "module."  # left in the public checkpoints by DataParallel


class Conv2d(nn.Module):
    """Conv + BatchNorm + ReLU, optionally adding the input before the ReLU (needs cin == cout, stride 1)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class Conv2dTranspose(nn.Module):
    """Transposed conv + BatchNorm + ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int, stride: int, padding: int, output_padding: int = 0
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding), nn.BatchNorm2d(cout)
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def _stage(cin: int, cout: int, stride: int | tuple[int, int], residual_blocks: int) -> nn.Sequential:
    """One encoder scale: a strided 3x3 conv followed by residual 3x3 convs."""
    blocks: list[nn.Module] = [Conv2d(cin, cout, 3, stride, 1)]
    blocks += [Conv2d(cout, cout, 3, 1, 1, residual=True) for _ in range(residual_blocks)]
    return nn.Sequential(*blocks)


def _up_stage(cin: int, cout: int, residual_blocks: int) -> nn.Sequential:
    """One decoder scale: a 2x transposed conv followed by residual 3x3 convs."""
    blocks: list[nn.Module] = [Conv2dTranspose(cin, cout, 3, 2, 1, output_padding=1)]
    blocks += [Conv2d(cout, cout, 3, 1, 1, residual=True) for _ in range(residual_blocks)]
    return nn.Sequential(*blocks)


def _face_encoder() -> nn.ModuleList:
    # Spatial size after each block: 96, 48, 24, 12, 6, 3, 1.
    return nn.ModuleList(
        [
            nn.Sequential(Conv2d(6, 16, 7, 1, 3)),
            _stage(16, 32, 2, 2),
            _stage(32, 64, 2, 3),
            _stage(64, 128, 2, 2),
            _stage(128, 256, 2, 2),
            _stage(256, 512, 2, 1),
            nn.Sequential(Conv2d(512, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0)),
        ]
    )


def _audio_encoder() -> nn.Sequential:
    # 80x16 mel window -> 80x16 -> 27x16 -> 9x6 -> 3x3 -> 1x1.
    return nn.Sequential(
        *_stage(1, 32, 1, 2),
        *_stage(32, 64, (3, 1), 2),
        *_stage(64, 128, 3, 2),
        *_stage(128, 256, (3, 2), 1),
        Conv2d(256, 512, 3, 1, 0),
        Conv2d(512, 512, 1, 1, 0),
    )


def _face_decoder() -> nn.ModuleList:
    # Input channels of each block = previous output + the skip connection concatenated to it.
    return nn.ModuleList(
        [
            nn.Sequential(Conv2d(512, 512, 1, 1, 0)),  # 1x1
            nn.Sequential(Conv2dTranspose(1024, 512, 3, 1, 0), Conv2d(512, 512, 3, 1, 1, residual=True)),  # 3x3
            _up_stage(1024, 512, 2),  # 6x6
            _up_stage(768, 384, 2),  # 12x12
            _up_stage(512, 256, 2),  # 24x24
            _up_stage(320, 128, 2),  # 48x48
            _up_stage(160, 64, 2),  # 96x96
        ]
    )


class Wav2LipGenerator(nn.Module):
    """forward(audio (B,1,80,16), faces (B,6,96,96) in [0,1]) -> mouth-synced faces (B,3,96,96) in (0,1)."""

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder_blocks = _face_encoder()
        self.audio_encoder = _audio_encoder()
        self.face_decoder_blocks = _face_decoder()
        self.output_block = nn.Sequential(Conv2d(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid())

    def forward(self, audio_sequences: torch.Tensor, face_sequences: torch.Tensor) -> torch.Tensor:
        return self.decode(audio_sequences, self.encode_faces(face_sequences))

    def encode_faces(self, face_sequences: torch.Tensor) -> list[torch.Tensor]:
        """The face encoder's outputs (the decoder's skip connections): computed once per avatar frame."""
        skips: list[torch.Tensor] = []
        x = face_sequences
        for block in self.face_encoder_blocks:
            x = block(x)
            skips.append(x)
        return skips

    def decode(self, audio_sequences: torch.Tensor, face_features: list[torch.Tensor]) -> torch.Tensor:
        skips = list(face_features)
        x = self.audio_encoder(audio_sequences)
        for block in self.face_decoder_blocks:
            x = torch.cat((block(x), skips.pop()), dim=1)
        return self.output_block(x)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the Wav2Lip generator."""


def _extract_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"expected a state dict or {{'state_dict': ...}}, got {type(checkpoint).__name__}")
    return {key.removeprefix(CHECKPOINT_PREFIX): value for key, value in checkpoint.items()}


def _mismatch_report(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    wrong_shape = [
        f"{key}: checkpoint {tuple(found[key].shape)}, model {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in found and tuple(found[key].shape) != tuple(tensor.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {'; '.join(wrong_shape)}")
    return problems


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Wav2LipGenerator:
    """Load a Wav2Lip generator checkpoint (``{"state_dict": ...}`` or bare, ``module.`` prefix optional).

    Entries beside ``state_dict`` (optimizer, global_step, ...) are ignored. Returns the model in eval mode.
    """
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    state_dict = _extract_state_dict(checkpoint)
    model = Wav2LipGenerator()
    problems = _mismatch_report(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{path} is not a Wav2Lip generator checkpoint: " + " | ".join(problems))
    model.load_state_dict(state_dict)
    return model.to(device).eval()


def _deterministic_values(key: str, shape: list[int]) -> np.ndarray:
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    n = math.prod(shape)
    if key.endswith("running_var"):
        values = rng.uniform(0.5, 1.5, n)
    elif key.endswith("running_mean"):
        values = rng.uniform(-0.1, 0.1, n)
    elif key.endswith(".weight") and len(shape) == 4:
        values = rng.standard_normal(n) * math.sqrt(2 / (shape[1] * shape[2] * shape[3])) * 0.7
    elif key.endswith(".weight") and len(shape) == 1:
        values = rng.uniform(0.8, 1.2, n)
    else:
        values = rng.uniform(-0.05, 0.05, n)
    return values.reshape(shape).astype(np.float32)


def deterministic_state_dict(json_path: str | Path) -> dict[str, torch.Tensor]:
    """The conformance fixtures' reproducible weights, built from the key list in ``wav2lip_state_dict.json``."""
    entries = json.loads(Path(json_path).read_text())["state_dict"]
    state_dict: dict[str, torch.Tensor] = {}
    for entry in entries:
        key, shape = entry["key"], entry["shape"]
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.zeros(shape, dtype=torch.int64)
        else:
            state_dict[key] = torch.from_numpy(_deterministic_values(key, shape))
    return state_dict

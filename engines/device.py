"""Which accelerator a torch engine runs on: ``auto`` tries hpu, then cuda, then cpu."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceChoice:
    device: str
    reason: str


def _hpu_available() -> bool:
    if importlib.util.find_spec("habana_frameworks") is None:
        return False
    try:
        import habana_frameworks.torch.hpu as hpu  # noqa: PLC0415 - optional, Gaudi hosts only

        return bool(hpu.is_available())
    except Exception:  # a broken Habana install must not stop a CPU server
        return False


def pick_device(requested: str = "auto") -> DeviceChoice:
    if requested != "auto":
        return DeviceChoice(requested, f"set in the configuration ({requested!r})")
    if _hpu_available():
        return DeviceChoice("hpu", "auto: Habana Gaudi (habana_frameworks) is available")
    import torch

    if torch.cuda.is_available():
        return DeviceChoice("cuda", f"auto: CUDA device {torch.cuda.get_device_name(0)!r} is available")
    return DeviceChoice("cpu", "auto: no Gaudi (habana_frameworks) and no CUDA device found")

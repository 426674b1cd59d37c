"""``facecast doctor``: which engines, models, devices and codecs this server would use, and why."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
from pathlib import Path

from aiortc import RTCRtpSender

from engines.avatar import AvatarCatalogue, AvatarError
from engines.base import EngineLoadError
from engines.device import pick_device
from media_server.cli import dependencies
from media_server.config import Settings
from media_server.runtime import build_engines

log = logging.getLogger(__name__)
# CPU features that decide which llama.cpp, onnxruntime and OpenVINO kernels run (Linux /proc/cpuinfo names).
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def _codecs() -> dict[str, list[str]]:
    return {
        kind: sorted({c.mimeType for c in RTCRtpSender.getCapabilities(kind).codecs if "rtx" not in c.mimeType})
        for kind in ("audio", "video")
    }


def _avatars(settings: Settings) -> dict[str, object]:
    catalogue = AvatarCatalogue(settings.server.avatars_dir)
    found: dict[str, object] = {}
    for name in catalogue.names():
        try:
            avatar = catalogue.get(name)
            found[name] = {"size": avatar.size, "frames": len(avatar.frames), "face": avatar.face_boxes[0].__dict__}
        except AvatarError as error:
            found[name] = {"error": str(error)}
    return found


def _cpu() -> dict[str, object]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return {"model": platform.processor() or None, "features": None}
    fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n", 1)[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name"), "features": [f for f in CPU_FEATURES if f in flags]}


def _engines(settings: Settings) -> dict[str, object]:
    """What each engine would use, or why they could not load (the rest of the report is still worth having)."""
    try:
        engines = build_engines(settings, warm_up=False)
    except EngineLoadError as error:
        return {"error": str(error)}
    engines.close()
    return engines.descriptions


def report(settings: Settings, constraints: Path = dependencies.CONSTRAINTS_FILE) -> dict[str, object]:
    """Versions first, warned about before any engine loads: an untested native library may crash the loading."""
    native, warnings = dependencies.report(constraints)
    for warning in warnings:
        log.warning("%s", warning)
    device = pick_device("auto")
    server = settings.server
    return {
        "platform": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "cpu": _cpu(),
        },
        "dependencies": native,
        "warnings": warnings,
        "device": {"picked": device.device, "why": device.reason},
        "engines": _engines(settings),
        "codecs": _codecs(),
        "avatars": _avatars(settings),
        "server": {"host": server.host, "port": server.port, "max_sessions": server.max_sessions},
        "cluster": _cluster(settings),
    }


def _cluster(settings: Settings) -> dict[str, object] | None:
    """The cluster's connection, when one is configured: NATS, JetStream, and the processes it has."""
    if settings.cluster.url is None:
        return None
    from media_server.cli.cluster_tools import check_connection  # imports NATS: only for a cluster

    return asyncio.run(check_connection(settings))

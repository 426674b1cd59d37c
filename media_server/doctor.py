"""``facecast doctor``: which engines, models, devices and codecs this server would use, and why."""

from __future__ import annotations

import os
import platform

from aiortc import RTCRtpSender

from engines.avatar import AvatarCatalogue, AvatarError
from engines.device import pick_device
from media_server.config import Settings
from media_server.runtime import build_engines


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


def report(settings: Settings) -> dict[str, object]:
    device = pick_device("auto")
    engines = build_engines(settings, warm_up=False)
    try:
        return {
            "platform": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
            "device": {"picked": device.device, "why": device.reason},
            "engines": engines.descriptions,
            "codecs": _codecs(),
            "avatars": _avatars(settings),
            "server": {"host": settings.server.host, "port": settings.server.port, "max_sessions": settings.server.max_sessions},
        }
    finally:
        engines.close()

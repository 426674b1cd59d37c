"""Where rendered MP4s go: each under a name of its own (concurrent requests never share a file), the
newest ``api.outputs_keep`` kept, and only names this directory gave out can be read back."""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path

from media_server.service.errors import NotFound

NAME = re.compile(r"facecast-\d{8}-\d{6}-[0-9a-f]{32}\.mp4")


class Outputs:
    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = directory
        self.keep = keep

    def new_path(self, unique: str | None = None) -> Path:
        """A path no other render has or will have (its name sorts by creation time); ``unique``, 32 hex
        digits, names it instead of a new random id (a cluster's render job id, say)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return self.directory / f"facecast-{stamp}-{unique or uuid.uuid4().hex}.mp4"

    def write(self, path: Path, content: bytes) -> None:
        """Write a finished MP4 under a temporary name first, so a half-written one is never served."""
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(content)
        os.replace(partial, path)

    def existing(self, name: str) -> Path:
        """The finished MP4 called ``name``; NotFound for any other name, however it is spelt."""
        if not NAME.fullmatch(name) or not (path := self.directory / name).is_file():
            raise NotFound(
                f"no output {name[:80]!r}: it was never rendered here, or is no longer kept (api.outputs_keep)"
            )
        return path

    def prune(self) -> None:
        """Delete all but the newest ``keep`` MP4s."""
        if not self.directory.is_dir():
            return
        finished = sorted((p for p in self.directory.iterdir() if NAME.fullmatch(p.name)), key=_modified)
        for old in finished[: max(0, len(finished) - self.keep)]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0

"""A Facecast server as its own process, as in production (so its memory, threads and CPU can be read
from /proc), and the clients the benchmarks talk to it with."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from media_server.testing.loopback_client import LoopbackClient
from media_server.testing.processes import stop_process


@contextlib.contextmanager
def free_ports(count: int) -> Iterator[list[int]]:
    """``count`` different free ports (all probed at once, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        yield [probe.getsockname()[1] for probe in probes]


class ServerProcess:
    def __init__(self, args: argparse.Namespace, extra_settings: list[str], port: int) -> None:
        """``facecast serve`` with the bench's own settings (``--config``, ``--set``), then ``extra_settings``."""
        self.port = port
        command = [sys.executable, "-m", "media_server"]
        if args.config:
            command += ["--config", str(args.config)]
        for pair in [*args.set, *extra_settings]:
            command += ["--set", pair]
        command += ["serve", "--port", str(self.port)]
        # A file, not a pipe: nobody reads the server's log during the run, and a full pipe would stall it.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - open as long as the server runs
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log)
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("server did not start")

    def rss_mb(self) -> float:
        return self._status("VmRSS") / 1024

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    def threads(self) -> int:
        return self._status("Threads")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def metric(self, name: str) -> float:
        """One unlabelled series of the server's /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)


def quiet_client(server: ServerProcess, keep_audio: bool = True) -> LoopbackClient:
    # A browser on a quiet network plays audio out within a packet or two; aiortc's fixed 80 ms would
    # be the test client's delay, not the server's.
    return LoopbackClient(server.url, keep_video=False, keep_audio=keep_audio, audio_jitter_buffer_packets=1)

"""A cluster on this machine for the tests and ``facecast bench cluster``: a real ``nats-server`` with
JetStream on a free port, and Facecast nodes and workers as real processes joined to it."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from engines import PROJECT_ROOT
from engines.avatar import AvatarCatalogue
from engines.base import LipSyncEngine
from media_server.cluster.avatars import SharedAvatars
from media_server.cluster.link import ClusterLink
from media_server.cluster.lipsync import RemoteLipSync
from media_server.cluster.lipsync_service import LipSyncService
from media_server.config import ClusterSettings
from media_server.testing.llama_server import free_port

T = TypeVar("T")

READY_TIMEOUT_S = 240.0


async def until(condition: Callable[[], object], timeout_s: float, failure: str) -> None:
    """``wait_until`` for async code: the event loop (and the aiortc clients on it) runs meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(failure)
        await asyncio.sleep(0.1)


class NatsServer:
    """``nats-server -js`` on a free port; stopped and started again on the same port and storage."""

    def __init__(self) -> None:
        executable = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(executable).exists():
            raise FileNotFoundError("nats-server is not installed (Debian: apt-get install nats-server)")
        self.executable = executable
        self.port = free_port()
        self.storage = Path(tempfile.mkdtemp(prefix="facecast-nats-"))
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [self.executable, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.storage)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _port_open(self.port), 15.0, "nats-server did not start")

    def kill(self) -> None:
        """Stop at once, as a crash would (connections dropped, nothing said)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.storage, ignore_errors=True)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition: Callable[[], object], timeout_s: float, failure: str) -> None:
    """Poll ``condition`` until it holds; TimeoutError saying ``failure`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(failure)


class FacecastProcess:
    """``facecast serve`` (a media node) or ``facecast worker`` in the cluster, its log in a file."""

    def __init__(self, role: str, node_id: str, nats: NatsServer, settings: Sequence[str] = ()) -> None:
        """Each process has its own avatars folder (a copy of the checkout's), as separate machines would."""
        self.role = role
        self.node_id = node_id
        self.port = free_port() if role == "serve" else None
        self.log_path = Path(tempfile.mkstemp(prefix=f"facecast-{node_id}-", suffix=".log")[1])
        self.avatars = Path(tempfile.mkdtemp(prefix=f"facecast-{node_id}-avatars-"))
        shutil.copytree(PROJECT_ROOT / "avatars", self.avatars, dirs_exist_ok=True)
        command = [sys.executable, "-m", "media_server", "--set", f"cluster.node_id={node_id}"]
        command += ["--set", f"server.avatars_dir={self.avatars}"]
        for pair in settings:
            command += ["--set", pair]
        command += [role, "--cluster", nats.url]
        if self.port is not None:
            command += ["--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}" if self.port else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until a node answers /healthz joined to the cluster, or a worker says it is ready."""

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.node_id} exited: {self.log()[-3000:]}")
            if self.url is None:
                return "ready: cluster" in self.log()
            try:
                return bool(self.get("/healthz")["cluster"]["connected"])
            except (OSError, urllib.error.URLError, KeyError):
                return False

        wait_until(ready, timeout_s, f"{self.node_id} did not start within {timeout_s:g} s (its log: {self.log_path})")

    def get(self, path: str) -> dict:
        assert self.url is not None
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return json.loads(response.read())

    def kill(self) -> None:
        """SIGKILL: the process dies mid-work, as a crashed machine would."""
        if self.alive():
            self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_path.unlink(missing_ok=True)
        shutil.rmtree(self.avatars, ignore_errors=True)


def cluster_entries(node: FacecastProcess) -> dict[str, dict]:
    """The cluster as ``node`` sees it (GET /api/cluster), by process id."""
    return {entry["id"]: entry for entry in node.get("/api/cluster")["nodes"]}


class LoopThread:
    """An event loop in its own thread, for the cluster's links while a test calls lip-sync streams the way
    the output does: blocking, from another thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cluster loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class InProcessWorker:
    """A lip-sync worker's service with ``engine``, in this process, on ``loop``: its link can be closed to
    play a worker that dies."""

    def __init__(self, nats: NatsServer, loop: LoopThread, engine: LipSyncEngine, name: str, sessions: int = 2) -> None:
        settings = ClusterSettings(url=nats.url, node_id=name, worker_sessions=sessions)
        self.link = ClusterLink(settings, role="worker")
        catalogue = AvatarCatalogue(PROJECT_ROOT / "avatars")
        self.service = LipSyncService(self.link, engine, SharedAvatars(self.link, catalogue))
        self.loop = loop
        loop.run(self.service.prepare(catalogue.names()), timeout_s=120)
        loop.run(self.link.start())
        if not loop.run(self.link.wait_connected(10)):
            raise TimeoutError(f"worker {name} could not connect to {nats.url}")
        wait_until(lambda: self.service.accepting, 10, f"worker {name} did not join the lease queue")

    def stop(self) -> None:
        """As a worker that dies: its subscriptions vanish with its connection."""
        self.loop.run(self.service.close())
        self.loop.run(self.link.close())


def remote_lipsync(nats_url: str, loop: LoopThread, fallback: LipSyncEngine, **settings: object) -> RemoteLipSync:
    """A media node's remote lip-sync engine, connected on ``loop``."""
    link = ClusterLink(ClusterSettings(url=nats_url, node_id="node", **settings), role="node")  # type: ignore[arg-type]
    loop.run(link.start())
    loop.run(link.wait_connected(10))
    return RemoteLipSync(link, fallback, link.settings)

"""llama-cpp-python's own OpenAI-compatible server on the embedded Gemma GGUF, for tests and benchmarks.

``running_llama_server()`` starts ``python -m llama_cpp.server`` on a free loopback port, waits until
it lists its model at ``/v1/models``, and stops it afterwards. Its output (llama.cpp's timings, the
server's request log) is kept, so a test can check what the server itself did. Needs the dev extra
(``llama-cpp-python[server]``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engines.llm.llama_cpp import LlamaCppLLM, cache_directory, embedded_model_path
from media_server.testing.processes import free_port, stop_process

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.1


@dataclass
class LlamaServer:
    process: subprocess.Popen[str]
    port: int
    model_path: Path
    lines: list[str] = field(default_factory=list)  # everything it printed so far, stdout and stderr together

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def output(self) -> str:
        return "\n".join(self.lines)

    def lines_with(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def wait_for_lines_with(self, text: str, count: int, timeout_s: float) -> bool:
        """Whether ``count`` lines of the server's output hold ``text`` within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.lines_with(text) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def models(self) -> list[str]:
        with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
            return [entry["id"] for entry in json.load(response)["data"]]

    def stop(self) -> None:
        stop_process(self.process)


def _collect(stream: Iterator[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))


@contextlib.contextmanager
def running_llama_server(
    model_path: Path | None = None, n_ctx: int = 2048, n_threads: int = 2, extra_args: Sequence[str] = ()
) -> Iterator[LlamaServer]:
    """A llama.cpp server on ``model_path`` (default: the embedded Gemma 3 270M), stopped on exit.

    It serves one request at a time and lets a new request wait rather than interrupt the running one
    (``--interrupt_requests False``), so a reply stops early only when its client goes away.
    """
    model = model_path or embedded_model_path(cache_directory(LlamaCppLLM.Settings()))
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--n_threads", str(n_threads),
        "--n_threads_batch", str(n_threads),
        "--seed", "0",
        "--interrupt_requests", "False",
        "--logits_all", "False",  # its default computes the logits of every prompt token: prompts read ~2x slower
        *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    server = LlamaServer(process, port, model)
    assert process.stdout is not None
    threading.Thread(target=_collect, args=(process.stdout, server.lines), daemon=True).start()
    try:
        _wait_until_serving(server)
        yield server
    finally:
        server.stop()


def _wait_until_serving(server: LlamaServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the llama.cpp server exited with {server.process.returncode}:\n{server.output()[-2000:]}"
            )
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            if server.models():
                return
        time.sleep(POLL_S)
    raise RuntimeError(f"the llama.cpp server did not serve /v1/models within {START_TIMEOUT_S:.0f} s")

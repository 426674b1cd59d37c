"""What the real-browser tests share: a `facecast serve` process, Debian's Chromium driven by Playwright
with a fake microphone that plays a spoken question, and a record of each page's console errors.

Test modules import the fixtures they use (``from tests.browser_support import browser, microphone_wav``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from engines.audio import resample
from media_server.testing.processes import free_port, stop_process
from media_server.testing.speech_corpus import espeak, write_wav

playwright_api = pytest.importorskip("playwright.async_api")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
QUESTION = "What is the capital of France?"
MIC_RATE = 48000
LEAD_SILENCE_S = 3.0  # the fake microphone starts at getUserMedia, before the session is connected
TAIL_SILENCE_S = 2.0
SERVER_START_TIMEOUT_S = 120


def healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


class ServerProcess:
    """`python -m media_server serve` as its own process (so the tests also prove the CLI), on a fixed port
    so that it can be restarted where its clients expect it."""

    def __init__(self, log_path: Path, *, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.args = args
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "media_server", *self.args, "serve", "--port", str(self.port)],
                cwd=PROJECT_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not healthy(self.base_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"facecast serve did not come up; its output:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process)
        self.process = None

    def keep_log(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(self.log_path, ARTIFACTS / name)


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The question as 48 kHz mono 16-bit PCM, with silence before and after it."""
    speech, rate = espeak(QUESTION)
    audio = np.concatenate(
        [
            np.zeros(int(LEAD_SILENCE_S * MIC_RATE), np.float32),
            resample(speech, rate, MIC_RATE),
            np.zeros(int(TAIL_SILENCE_S * MIC_RATE), np.float32),
        ]
    )
    return write_wav(tmp_path_factory.mktemp("mic") / "question.wav", audio, MIC_RATE)


@pytest_asyncio.fixture(scope="module")
async def browser(microphone_wav: Path) -> AsyncIterator:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={microphone_wav}%noloop",
            ],
        )
        yield launched
        await launched.close()


class PageProblems:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page) -> None:  # noqa: ANN001 - playwright's Page
        self.errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

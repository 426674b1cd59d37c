"""The talk page in a real headless Chromium against a real `facecast serve` process.

Chromium's fake microphone plays a WAV file made here with espeak-ng, so the whole path runs:
getUserMedia → WebRTC → VAD → ASR → LLM → TTS → lip-sync → the page's <video> and chat.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from media_server.audio import resample
from media_server.speech_corpus import espeak

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect

pytestmark = pytest.mark.browser

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
QUESTION = "What is the capital of France?"
MIC_RATE = 48000
LEAD_SILENCE_S = 3.0  # the fake microphone starts at getUserMedia, before the session is connected
TAIL_SILENCE_S = 2.0
SERVER_START_TIMEOUT_S = 120
TURN_TIMEOUT_MS = 45_000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m media_server serve` as its own process: the browser test also proves the CLI works."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "media_server", "serve", "--port", str(port)],
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while not _healthy(base_url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"facecast serve did not come up; its output:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.3)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log_path, ARTIFACTS / "browser-serve.log")


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
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(MIC_RATE)
        writer.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


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


@pytest_asyncio.fixture
async def page(browser, served: str, request: pytest.FixtureRequest) -> AsyncIterator:
    context = await browser.new_context(base_url=served, viewport={"width": 1280, "height": 820})
    opened = await context.new_page()
    opened.problems = PageProblems(opened)
    await opened.goto("/")
    yield opened
    # How the page ended up, to see what went wrong when a test fails.
    ARTIFACTS.mkdir(exist_ok=True)
    await opened.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    await context.close()


VIDEO_PROBE = """async () => {
  const video = document.querySelector('[data-testid="avatar-video"]');
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const grab = () => {
    context.drawImage(video, 0, 0);
    return context.getImageData(0, 0, canvas.width, canvas.height).data;
  };
  const startTime = video.currentTime;
  let previous = grab();
  let mostChanged = 0;
  for (let i = 0; i < 4; i++) {
    await new Promise((resolve) => setTimeout(resolve, 300));
    const current = grab();
    let changed = 0;
    for (let p = 0; p < current.length; p += 4) {
      const delta = Math.abs(current[p] - previous[p]) + Math.abs(current[p + 1] - previous[p + 1]) + Math.abs(current[p + 2] - previous[p + 2]);
      if (delta > 24) changed++;
    }
    mostChanged = Math.max(mostChanged, changed);
    previous = current;
  }
  return { width: video.videoWidth, height: video.videoHeight, advanced: video.currentTime - startTime, mostChanged };
}"""

AUDIO_STATS = """async () => {
  const report = await window.facecast.pc.getStats();
  for (const stats of report.values()) {
    if (stats.type === "inbound-rtp" && stats.kind === "audio") return { bytes: stats.bytesReceived, energy: stats.totalAudioEnergy ?? 0 };
  }
  return { bytes: 0, energy: 0 };
}"""


async def test_page_loads_with_pickers_filled(page):
    await expect(page.get_by_test_id("avatar-select").locator("option")).not_to_have_count(0)
    await expect(page.get_by_test_id("avatar-select")).to_have_value("default")
    await expect(page.get_by_test_id("persona-select")).to_have_value("assistant")
    assert "guide" in await page.get_by_test_id("persona-select").locator("option").evaluate_all("os => os.map(o => o.value)")
    assert "joe" in await page.get_by_test_id("voice-select").locator("option").all_inner_texts()
    await expect(page.get_by_test_id("state")).to_have_attribute("data-state", "offline")
    await expect(page.get_by_test_id("notice")).to_be_hidden()  # 127.0.0.1 is a secure context
    await expect(page.get_by_test_id("error")).to_be_hidden()
    assert page.problems.errors == []


async def test_talking_with_the_microphone(page):
    await page.get_by_test_id("talk-button").click()
    await expect(page.get_by_test_id("talk-button")).to_have_text(re.compile("Stop"))

    # The fake microphone's speech moves the level meter.
    await expect(page.get_by_test_id("mic-meter")).to_have_attribute("aria-valuenow", re.compile("^[1-9]"), timeout=15_000)
    question = page.locator('[data-testid="user-message"]:not(.partial) .msg-text')
    await expect(question.first).to_have_text(re.compile("capital|france", re.I), timeout=TURN_TIMEOUT_MS)
    # The latency line appears when the reply starts playing, and the reply is captioned.
    await expect(page.get_by_test_id("latency").first).to_be_visible(timeout=TURN_TIMEOUT_MS)
    await expect(page.get_by_test_id("avatar-message").first.locator(".msg-text")).to_have_text(re.compile(r"\w"))
    await expect(page.get_by_test_id("captions")).to_have_class(re.compile("avatar"))

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "talk.png"))
    video = await page.evaluate(VIDEO_PROBE)
    assert video["width"] > 0 and video["height"] > 0, video
    assert video["advanced"] > 0.5, video
    assert video["mostChanged"] > 50, f"the avatar's frames did not change while it spoke: {video}"

    audio = await page.evaluate(AUDIO_STATS)
    assert audio["bytes"] > 0 and audio["energy"] > 0, f"no audible avatar audio was received: {audio}"
    assert page.problems.errors == []


async def test_typing_and_interrupting(page):
    await page.get_by_test_id("text-input").fill("What is the capital of Italy?")
    await page.get_by_test_id("send-button").click()

    await expect(page.get_by_test_id("user-message").first.locator(".msg-text")).to_have_text(
        "What is the capital of Italy?", timeout=TURN_TIMEOUT_MS
    )
    # Typing first connects without a microphone: Talk stays available to add one.
    await expect(page.get_by_test_id("talk-button")).to_have_text(re.compile("Talk"))
    await expect(page.get_by_test_id("end-button")).to_be_visible()
    first_reply = page.get_by_test_id("avatar-message").first
    await expect(first_reply).not_to_have_class(re.compile("streaming"), timeout=TURN_TIMEOUT_MS)
    await expect(first_reply.locator(".msg-text")).to_have_text(re.compile(r"\w"))
    await expect(page.get_by_test_id("state")).to_have_attribute("data-state", "listening", timeout=TURN_TIMEOUT_MS)

    await page.get_by_test_id("text-input").fill("Tell me a long story about a brave knight and a dragon.")
    await page.get_by_test_id("send-button").click()
    # Interrupt as soon as the reply has begun: the tiny model's "long story" can be one short sentence.
    second_reply = page.get_by_test_id("avatar-message").nth(1)
    await expect(second_reply.locator(".msg-text")).to_have_text(re.compile(r"\w"), timeout=TURN_TIMEOUT_MS)
    await page.get_by_test_id("interrupt-button").click()
    await expect(page.get_by_test_id("interrupted-marker")).to_have_text(re.compile("interrupted"), timeout=5_000)
    await expect(page.get_by_test_id("state")).to_have_attribute("data-state", "listening", timeout=5_000)
    await expect(second_reply.locator(".msg-tag")).to_have_text("interrupted")
    assert page.problems.errors == []

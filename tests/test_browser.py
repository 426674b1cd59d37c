"""The talk page in a real headless Chromium against a real `facecast serve` process.

Chromium's fake microphone plays a WAV file made here with espeak-ng, so the whole path runs:
getUserMedia → WebRTC → VAD → ASR → LLM → TTS → lip-sync → the page's <video> and chat.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.browser_support import ARTIFACTS, PageProblems, ServerProcess, browser, microphone_wav  # noqa: F401 - fixtures

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect

pytestmark = pytest.mark.browser

TURN_TIMEOUT_MS = 45_000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    knowledge = tmp_path_factory.mktemp("knowledge")  # documents dropped on the page go here
    server = ServerProcess(tmp_path_factory.mktemp("server") / "serve.log", args=("--set", f"knowledge.dir={knowledge}"))
    server.start()
    try:
        yield server.base_url
    finally:
        server.stop()
        server.keep_log("browser-serve.log")


@pytest_asyncio.fixture
async def page(browser, served: str, request: pytest.FixtureRequest) -> AsyncIterator:  # noqa: F811
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


VIDEO_STATS = """async () => {
  const report = await window.facecast.pc.getStats();
  for (const stats of report.values()) {
    if (stats.type === "inbound-rtp" && stats.kind === "video") {
      return { frames: stats.framesDecoded, pli: stats.pliCount, fir: stats.firCount, freezes: stats.freezeCount };
    }
  }
  return null;
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


DROP_FILE = """([name, text]) => {
  const files = new DataTransfer();
  files.items.add(new File([text], name, { type: "text/plain" }));
  const panel = document.querySelector('[data-testid="chat-panel"]');
  panel.dispatchEvent(new DragEvent("dragenter", { dataTransfer: files, bubbles: true }));
  panel.dispatchEvent(new DragEvent("drop", { dataTransfer: files, bubbles: true, cancelable: true }));
}"""
HANDBOOK = (
    "# Facilities\n\n## Coffee\n\nThe Zorblax QX-7731 coffee machine is kept in room 4.12 on the fourth floor. "
    "Its descaling code is 5548-TRQ, and only facilities staff may run the descaling.\n"
)


async def test_documents_dropped_on_the_chat_answer_questions_with_their_sources_and_sentences_show_as_spoken(page):
    status = page.get_by_test_id("upload-status")

    async def slow_options(route) -> None:  # noqa: ANN001 - playwright's Route
        await asyncio.sleep(1.0)
        await route.continue_()

    # Files dropped before the page has heard which personas take documents wait for it.
    await page.route("**/api/options", slow_options)
    await page.reload()
    await page.evaluate(DROP_FILE, ["report.docx", "not a document"])
    await expect(page.get_by_test_id("error")).to_contain_text("report.docx: only PDF, Markdown, text and HTML")
    await page.evaluate(DROP_FILE, ["empty.md", ""])
    await expect(status.last).to_have_text(re.compile("Not added: empty.md is empty"), timeout=TURN_TIMEOUT_MS)
    await page.evaluate(DROP_FILE, ["handbook.md", HANDBOOK])
    await expect(status.last).to_have_text(
        re.compile(r"Added to Ava's documents: handbook.md \(1 passage\)"), timeout=TURN_TIMEOUT_MS
    )

    await page.get_by_test_id("text-input").fill("What is the descaling code of the Zorblax QX-7731 coffee machine?")
    await page.get_by_test_id("send-button").click()
    reply = page.get_by_test_id("avatar-message").first
    await expect(reply.get_by_test_id("sources")).to_contain_text("handbook.md, Facilities > Coffee", timeout=TURN_TIMEOUT_MS)
    # While it speaks, the sentence being said is marked; once it has spoken, all of the reply is said.
    await expect(reply.locator(".msg-saying")).to_have_text(re.compile(r"\w"), timeout=TURN_TIMEOUT_MS)
    await expect(page.get_by_test_id("state")).to_have_attribute("data-state", "listening", timeout=TURN_TIMEOUT_MS)
    await expect(reply.locator(".msg-unsaid")).to_have_text("")
    await expect(reply.locator(".msg-said")).to_have_text(re.compile("5548"))
    assert [e for e in page.problems.errors if "status of 400" not in e] == []  # the empty document's refusal


async def test_an_idle_avatars_video_stays_live_without_asking_for_keyframes(page):
    await page.get_by_test_id("text-input").fill("Hello!")
    await page.get_by_test_id("send-button").click()
    reply = page.get_by_test_id("avatar-message").first
    await expect(reply).not_to_have_class(re.compile("streaming"), timeout=TURN_TIMEOUT_MS)
    await expect(page.get_by_test_id("state")).to_have_attribute("data-state", "listening", timeout=TURN_TIMEOUT_MS)
    before = await page.evaluate(VIDEO_STATS)
    await page.wait_for_timeout(8000)
    after = await page.evaluate(VIDEO_STATS)
    # Only changed pictures come, and the still one again every second: Chromium plays them as they come
    # and asks for no keyframe (its stats do count the longer gaps as freezes).
    assert after["frames"] - before["frames"] >= 8, (before, after)
    assert (after["pli"], after["fir"]) == (before["pli"], before["fir"]), (before, after)
    assert page.problems.errors == []

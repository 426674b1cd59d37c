"""The kiosk, OBS and embed pages in a real headless Chromium against a real `facecast serve` process.

- /obs watches a broadcast session: only the avatar on the chosen background (checked on the
  screenshot's pixels), and an API `say` makes it speak;
- embed.js on a page of another origin (a second web server started here) works when the server
  allows that origin and tells the visitor why when it does not;
- the kiosk starts by itself, listens hands-free (Chromium's fake microphone asks a question), returns
  to its attract screen with a fresh conversation after a quiet spell, and reconnects after the server
  process is restarted on the same port. It runs last: it restarts the server.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator

import aiohttp
import cv2
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web

from tests.browser_support import ARTIFACTS, PageProblems, ServerProcess, browser, free_port, microphone_wav  # noqa: F401 - fixtures

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect

pytestmark = pytest.mark.browser

GREEN_BGR = (0, 255, 0)
VIEWPORT = {"width": 1280, "height": 720}
TURN_TIMEOUT_MS = 45_000
ALLOWED_PORT, REFUSED_PORT = free_port(), free_port()
ALLOWED_ORIGIN = f"http://127.0.0.1:{ALLOWED_PORT}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("server") / "serve.log",
        args=("--set", f'server.allowed_origins=["{ALLOWED_ORIGIN}"]', "--set", "server.max_sessions=4"),
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
        process.keep_log("pages-serve.log")


@pytest_asyncio.fixture(scope="module")
async def other_sites(server: ServerProcess) -> AsyncIterator[dict[str, str]]:
    """Two shops on other origins, each embedding the avatar with one script tag; only the first is allowed."""
    page = f"""<!doctype html><html><head><title>A shop</title><link rel="icon" href="data:,"></head>
<body><h1>A shop somewhere else</h1>
<script src="{server.base_url}/embed.js" data-position="bottom-right" data-persona="assistant" async></script>
</body></html>"""

    async def shop(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", shop)
    runner = web.AppRunner(app)
    await runner.setup()
    for port in (ALLOWED_PORT, REFUSED_PORT):
        await web.TCPSite(runner, "127.0.0.1", port).start()
    yield {"allowed": ALLOWED_ORIGIN, "refused": f"http://127.0.0.1:{REFUSED_PORT}"}
    await runner.cleanup()


@pytest_asyncio.fixture
async def context(browser, server: ServerProcess, request: pytest.FixtureRequest) -> AsyncIterator:  # noqa: F811
    opened = await browser.new_context(base_url=server.base_url, viewport=VIEWPORT)
    yield opened
    ARTIFACTS.mkdir(exist_ok=True)
    for number, page in enumerate(opened.pages):
        await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{number}.png"))
    await opened.close()


async def api(server: ServerProcess, method: str, path: str, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.request(method, server.base_url + path, **kwargs) as response:
        return response.status, await response.json()


@pytest_asyncio.fixture
async def broadcast(server: ServerProcess) -> AsyncIterator[str]:
    status, body = await api(server, "POST", "/api/sessions", json={"id": "show"})
    assert status == 201, body
    yield "show"
    await api(server, "DELETE", "/api/sessions/show")


def pixels(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


AUDIO_ENERGY = """async () => {
  const report = await window.facecastObs.client.pc.getStats();
  for (const stats of report.values()) {
    if (stats.type === "inbound-rtp" && stats.kind === "audio") return stats.totalAudioEnergy ?? 0;
  }
  return 0;
}"""


async def test_obs_shows_only_the_avatar_on_green_and_speaks(broadcast, context, server):
    page = await context.new_page()
    problems = PageProblems(page)
    await page.goto(f"/obs?session={broadcast}&bg=green&captions=1")
    await expect(page.locator("body")).to_have_attribute("data-obs", "live", timeout=20_000)
    # Drawn once the cut-out mask has arrived: the canvas then has the video's size.
    await page.wait_for_function("document.querySelector('canvas').width === 512", timeout=20_000)
    await page.wait_for_timeout(500)

    shot = pixels(await page.screenshot())
    height, width = shot.shape[:2]
    side = height  # the square avatar is scaled to the viewport's height, centred
    left = (width - side) // 2
    for x, y in [(2, 2), (width - 3, 2), (2, height - 3), (width - 3, height - 3)]:  # beside the avatar
        assert tuple(shot[y, x][:3]) == GREEN_BGR, (x, y, shot[y, x])
    for x, y in [(left + 12, 12), (left + side - 12, 12)]:  # the photo's own background, keyed out
        assert tuple(shot[y, x][:3]) == GREEN_BGR, (x, y, shot[y, x])
    face = shot[int(0.35 * side) : int(0.45 * side), left + int(0.45 * side) : left + int(0.55 * side), :3]
    assert np.abs(face.astype(int) - GREEN_BGR).sum(axis=2).min() > 150, "the avatar's face is not on the page"
    await expect(page.get_by_test_id("captions")).to_be_hidden()

    status, _ = await api(
        server, "POST", f"/api/sessions/{broadcast}/say", json={"text": "Hello OBS, the stream is starting now."}
    )
    assert status == 202
    await expect(page.locator("body")).to_have_attribute("data-state", "speaking", timeout=20_000)
    await expect(page.get_by_test_id("captions")).to_have_text("Hello OBS, the stream is starting now.")
    await page.wait_for_function(f"({AUDIO_ENERGY})().then((energy) => energy > 0.01)", timeout=20_000, polling=250)
    assert problems.errors == []


async def test_obs_transparent_background(broadcast, context):
    page = await context.new_page()
    await page.goto(f"/obs?session={broadcast}&bg=transparent")
    await page.wait_for_function("document.querySelector('canvas').width === 512", timeout=20_000)
    await page.wait_for_timeout(500)
    shot = pixels(await page.screenshot(omit_background=True))
    assert shot.shape[2] == 4
    left = (shot.shape[1] - shot.shape[0]) // 2
    assert shot[2, 2, 3] == 0 and shot[12, left + 12, 3] == 0  # beside the avatar, and its photo's background
    assert shot[int(0.4 * shot.shape[0]), shot.shape[1] // 2, 3] == 255  # the face


async def test_obs_with_no_broadcast_starts_the_default_one_and_shows_the_avatar(context, server):
    status, listed = await api(server, "GET", "/api/sessions")
    assert status == 200 and listed["sessions"] == []
    page = await context.new_page()
    problems = PageProblems(page)
    await page.goto("/obs")
    await expect(page.locator("body")).to_have_attribute("data-obs", "live", timeout=20_000)
    await expect(page.get_by_test_id("status")).to_be_hidden()
    status, described = await api(server, "GET", "/api/sessions/main")
    assert status == 200 and described["viewers"] == 1
    status, _ = await api(server, "POST", "/api/sessions/main/say", json={"text": "The default broadcast is live."})
    assert status == 202
    await expect(page.locator("body")).to_have_attribute("data-state", "speaking", timeout=20_000)
    await page.close()
    assert problems.errors == []
    await api(server, "DELETE", "/api/sessions/main")  # it would stop by itself once unwatched, a while later


async def test_obs_says_in_words_why_a_broadcast_cannot_be_shown(context):
    page = await context.new_page()
    await page.goto("/obs?session=missing")
    status = page.get_by_test_id("status")
    await expect(status).to_be_visible(timeout=20_000)
    await expect(status).to_contain_text("no broadcast session 'missing'; create it with POST /api/sessions")


async def test_embed_works_from_an_allowed_origin(context, other_sites):
    page = await context.new_page()
    problems = PageProblems(page)
    await page.goto(other_sites["allowed"])
    await page.get_by_test_id("embed-bubble").click()
    panel = page.get_by_test_id("embed-panel")
    await expect(panel).to_be_visible()
    await panel.locator("input").fill("What is the capital of Italy?")
    await panel.locator("button.send").click()
    await expect(panel).to_have_attribute("data-reply", re.compile(r"\w"), timeout=TURN_TIMEOUT_MS)
    await expect(panel).to_have_attribute("data-state", "speaking", timeout=TURN_TIMEOUT_MS)
    playing = await panel.locator("video").evaluate("v => v.readyState >= 2 && v.videoWidth > 0 && !v.paused")
    assert playing
    await expect(page.get_by_test_id("embed-notice")).to_be_empty()
    assert problems.errors == []


async def test_embed_is_refused_from_another_origin(context, other_sites):
    page = await context.new_page()
    await page.goto(other_sites["refused"])
    await page.get_by_test_id("embed-bubble").click()
    notice = page.get_by_test_id("embed-notice")
    await expect(notice).to_contain_text("This site cannot use this avatar", timeout=10_000)
    await expect(notice).to_contain_text(f"{other_sites['refused']} may not use this Facecast server")
    await expect(page.get_by_test_id("embed-panel").locator("button.send")).to_be_disabled()


async def test_kiosk_starts_by_itself_and_reconnects_after_a_server_restart(context, server):
    page = await context.new_page()
    problems = PageProblems(page)
    await page.goto("/kiosk?idle=6&max_backoff=3")
    body, attract, captions = page.locator("body"), page.get_by_test_id("attract"), page.get_by_test_id("captions")
    kiosk_connects = "window.facecastKiosk.connects"
    await expect(body).to_have_attribute("data-kiosk", "live", timeout=20_000)
    await expect(body).to_have_attribute("data-state", "listening")
    await expect(attract).to_be_visible()
    # Hands-free: the fake microphone's question is captioned, then the avatar's answer.
    await expect(captions).to_have_text(re.compile("capital|france", re.IGNORECASE), timeout=TURN_TIMEOUT_MS)
    await expect(attract).to_be_hidden()
    await expect(captions).to_have_class(re.compile("avatar"), timeout=TURN_TIMEOUT_MS)
    assert await page.evaluate(kiosk_connects) == 1
    # A quiet spell: the attract screen again, and a fresh conversation for the next visitor.
    await expect(attract).to_be_visible(timeout=30_000)
    await page.wait_for_function(f"{kiosk_connects} === 2", timeout=15_000)
    before_restart = await page.evaluate("window.facecastKiosk.client.sessionId")

    await asyncio.to_thread(server.stop)
    await expect(body).to_have_attribute("data-kiosk", "reconnecting", timeout=15_000)
    await asyncio.to_thread(server.start)
    await page.wait_for_function(f"{kiosk_connects} === 3", timeout=30_000)
    await expect(body).to_have_attribute("data-kiosk", "live")
    assert await page.evaluate("window.facecastKiosk.client.sessionId") != before_restart
    video = "document.querySelector('[data-testid=avatar-video]')"
    await page.wait_for_function(f"!{video}.paused && {video}.videoWidth > 0", timeout=10_000)
    # While the server was down the page logged its failed requests; nothing else went wrong.
    assert [
        e for e in problems.errors if "Failed to load resource" not in e and "ERR_CONNECTION_REFUSED" not in e
    ] == []

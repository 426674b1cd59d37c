"""Broadcast sessions over real HTTP and WebRTC: the API and its token, viewers over WHEP, RTMP push.

The viewers are real aiortc peers; the RTMP test publishes to a real nginx with the RTMP module,
started here on loopback, and reads the published stream back with PyAV.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from media_server.http.app import create_app
from media_server.http.state import SESSIONS
from media_server.testing.loopback_client import LoopbackClient
from media_server.testing.processes import free_port, stop_process

TOKEN = "test-token-0123456789abcdef"
LOUD_RMS = 0.02
NGINX = Path("/usr/sbin/nginx")
RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")


async def call(method: str, url: str, **kwargs) -> tuple[int, dict | str, dict]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body, dict(response.headers)


@pytest_asyncio.fixture
async def broadcasts(live_server) -> AsyncIterator[web.Application]:
    """The live server's app; every broadcast session a test leaves open is closed after it."""
    yield live_server.app
    for session in list(live_server.app[SESSIONS].broadcasts.values()):
        await session.close()


@pytest_asyncio.fixture
async def viewers() -> AsyncIterator:
    watching: list[LoopbackClient] = []

    async def watch(base_url: str, broadcast_id: str | None) -> LoopbackClient:
        viewer = LoopbackClient(base_url, microphone=False)
        watching.append(viewer)
        await viewer.watch(broadcast_id)
        return viewer

    yield watch
    for viewer in watching:
        with contextlib.suppress(Exception):
            await viewer.close()


@pytest_asyncio.fixture(scope="module")
async def token_server(runtime) -> AsyncIterator[str]:
    """A second server on the same loaded engines, with an API token configured."""
    server = runtime.settings.server.model_copy(update={"api_token": TOKEN})
    app = create_app(dataclasses.replace(runtime, settings=runtime.settings.model_copy(update={"server": server})))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


async def wait_until_loud(viewer: LoopbackClient, after: float, timeout_s: float = 30.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (loud := viewer.recording.first_loud_audio_after(after, LOUD_RMS)) is None:
        assert time.monotonic() < deadline, "the viewer heard nothing loud"
        await asyncio.sleep(0.1)
    return loud


async def test_the_api_needs_the_configured_token(token_server):
    status, body, headers = await call("POST", f"{token_server}/api/sessions", json={})
    assert (
        status == 401 and body["error"]["code"] == "unauthorized" and headers["WWW-Authenticate"].startswith("Bearer")
    )
    status, body, _ = await call(
        "POST", f"{token_server}/api/sessions/x/say", json={"text": "hi"}, headers={"Authorization": "Bearer wrong"}
    )
    assert status == 401 and body["error"]["message"] == "wrong API token"

    authorized = {"Authorization": f"Bearer {TOKEN}"}
    status, body, headers = await call("POST", f"{token_server}/api/sessions", json={"id": "tok"}, headers=authorized)
    assert status == 201 and headers["Location"] == "/api/sessions/tok" and body["whep_url"] == "/whep/tok"
    status, body, _ = await call("DELETE", f"{token_server}/api/sessions/tok", headers=authorized)
    assert status == 200 and body == {"closed": "tok"}


async def test_without_a_token_the_api_answers_only_this_machine(base_url, broadcasts):
    status, body, _ = await call(
        "POST", f"{base_url}/api/sessions", json={}, headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert status == 403 and body["error"]["code"] == "api_token_required"
    status, body, _ = await call("GET", f"{base_url}/api/sessions")
    assert status == 200 and body == {"sessions": []}


async def test_bad_requests_get_clear_errors(base_url, broadcasts):
    assert (await call("POST", f"{base_url}/api/sessions", json={"id": "no spaces"}))[0] == 400
    status, body, _ = await call("POST", f"{base_url}/api/sessions", json={"persona": "nobody"})
    assert status == 404 and "assistant" in body["error"]["message"]
    assert (await call("POST", f"{base_url}/api/sessions", json={"id": "dup"}))[0] == 201
    status, body, _ = await call("POST", f"{base_url}/api/sessions", json={"id": "dup"})
    assert status == 409 and body["error"]["code"] == "session_exists"
    status, body, _ = await call("POST", f"{base_url}/api/sessions/dup/say", json={"text": "  "})
    assert status == 400 and "text" in body["error"]["message"]
    status, body, _ = await call("POST", f"{base_url}/api/sessions/nope/say", json={"text": "hello"})
    assert status == 404 and "POST /api/sessions" in body["error"]["message"]


async def test_say_is_heard_by_every_viewer(base_url, broadcasts, viewers):
    assert (await call("POST", f"{base_url}/api/sessions", json={"id": "show"}))[0] == 201
    first, second = await viewers(base_url, "show"), await viewers(base_url, "show")
    await first.wait_for(lambda e: e["type"] == "session" and e.get("broadcast"))
    assert (await call("GET", f"{base_url}/api/sessions/show"))[1]["viewers"] == 2

    asked = time.monotonic()
    said = await call(
        "POST", f"{base_url}/api/sessions/show/say", json={"text": "Hello everybody, welcome to the stream!"}
    )
    assert said[0] == 202
    for viewer in (first, second):
        await wait_until_loud(viewer, asked)
        reply = await viewer.wait_for(lambda e: e["type"] == "reply" and e["final"], after=asked)
        assert reply["text"] == "Hello everybody, welcome to the stream!"
    await first.wait_for(lambda e: e["type"] == "state" and e["state"] == "listening", after=asked)
    assert first.recording.video and first.recording.video[-1].size == (512, 512)


async def test_chat_is_answered_as_the_persona(base_url, broadcasts, viewers):
    assert (await call("POST", f"{base_url}/api/sessions", json={"id": "bot", "persona": "guide"}))[0] == 201
    viewer = await viewers(base_url, "bot")
    asked = time.monotonic()
    status, body, _ = await call(
        "POST", f"{base_url}/api/sessions/bot/chat", json={"text": "Who painted the Mona Lisa?"}
    )
    assert status == 200, body
    assert body["reply"].strip() and not body["interrupted"], body
    event = await viewer.wait_for(lambda e: e["type"] == "reply" and e["final"], after=asked)
    assert event["text"] == body["reply"]
    await wait_until_loud(viewer, asked)


async def test_whep_offer_answer_and_delete(base_url, broadcasts):
    assert (await call("POST", f"{base_url}/api/sessions", json={"id": "main"}))[0] == 201
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    frames: dict[str, int] = {"audio": 0, "video": 0}

    async def read(track: MediaStreamTrack) -> None:
        with contextlib.suppress(Exception):
            while True:
                await track.recv()
                frames[track.kind] += 1

    pc.on("track", lambda track: asyncio.ensure_future(read(track)))
    await pc.setLocalDescription(await pc.createOffer())
    status, answer, headers = await call(
        "POST", f"{base_url}/whep", data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
    )
    assert status == 201 and headers["Content-Type"].startswith("application/sdp"), answer
    location = headers["Location"]
    assert location.startswith("/whep/main/")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    deadline = time.monotonic() + 20
    while min(frames.values()) < 10:
        assert time.monotonic() < deadline, f"frames received: {frames}"
        await asyncio.sleep(0.1)
    assert (
        await call(
            "PATCH",
            base_url + location,
            data="a=candidate",
            headers={"Content-Type": "application/trickle-ice-sdpfrag"},
        )
    )[0] == 405

    assert (await call("DELETE", base_url + location))[0] == 200
    assert (await call("GET", f"{base_url}/api/sessions/main"))[1]["viewers"] == 0
    assert (await call("DELETE", base_url + location))[0] == 404
    await pc.close()

    sdp_headers = {"Content-Type": "application/sdp"}
    assert (await call("POST", f"{base_url}/whep/main", json={"sdp": "v=0"}))[0] == 415
    assert (await call("POST", f"{base_url}/whep/nobody", data=answer, headers=sdp_headers))[0] == 404
    assert (await call("POST", f"{base_url}/whep/main", data="hello", headers=sdp_headers))[0] == 400


# --- RTMP push to a real nginx-rtmp --------------------------------------------------------


NGINX_CONF = """load_module {module};
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        application live {{ live on; record off; wait_key on; wait_video on; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def rtmp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nginx with libnginx-mod-rtmp on a loopback port: rtmp://127.0.0.1:PORT/live."""
    if not NGINX.exists() or not RTMP_MODULE.exists():
        pytest.skip("nginx with the RTMP module is not installed (apt-get install nginx libnginx-mod-rtmp)")
    directory = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(module=RTMP_MODULE, dir=directory, port=port))
    process = subprocess.Popen([str(NGINX), "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)])
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nginx did not start: {(directory / 'error.log').read_text()}")
            time.sleep(0.1)
        yield f"rtmp://127.0.0.1:{port}/live"
    finally:
        stop_process(process)
        shutil.rmtree(directory, ignore_errors=True)


def read_stream(url: str, seconds: float) -> dict[str, object]:
    """Play the published stream for ``seconds`` of its media: codecs, decoded frame counts, loudest audio."""
    found: dict[str, object] = {"video_frames": 0, "audio_frames": 0, "loudest_rms": 0.0, "size": None}
    with av.open(url, timeout=15) as container:
        found["codecs"] = sorted(
            f"{s.type}:{s.codec_context.name}" for s in container.streams if s.type in ("audio", "video")
        )
        for frame in container.decode(*[s for s in container.streams if s.type in ("audio", "video")]):
            if isinstance(frame, av.VideoFrame):
                found["video_frames"] += 1
                found["size"] = (frame.width, frame.height)
            else:
                found["audio_frames"] += 1
                samples = frame.to_ndarray().astype(np.float32)
                found["loudest_rms"] = max(found["loudest_rms"], float(np.sqrt(np.mean(samples**2))))
            if frame.time is not None and found["video_frames"] and frame.time >= seconds:
                break
    return found


async def test_rtmp_push_is_readable_with_audio_and_video(base_url, broadcasts, rtmp_server):
    url = f"{rtmp_server}/facecast"
    status, body, _ = await call("POST", f"{base_url}/api/sessions", json={"id": "streamed", "rtmp_url": url})
    assert status == 201 and body["rtmp"][0]["url"].endswith("/…")  # the stream key never shows
    deadline = time.monotonic() + 20
    while (await call("GET", f"{base_url}/api/sessions/streamed"))[1]["rtmp"][0]["status"] != "live":
        assert time.monotonic() < deadline, "the RTMP push never went live"
        await asyncio.sleep(0.2)

    reading = asyncio.create_task(asyncio.to_thread(read_stream, url, 6.0))
    await asyncio.sleep(1.0)
    await call("POST", f"{base_url}/api/sessions/streamed/say", json={"text": "We are live on the stream now."})
    found = await asyncio.wait_for(reading, 60)
    assert found["codecs"] == ["audio:aac", "video:h264"], found
    assert found["video_frames"] >= 50 and found["audio_frames"] >= 100, found
    assert found["size"] == (512, 512), found
    assert found["loudest_rms"] > LOUD_RMS, f"the avatar's speech did not reach the stream: {found}"

    status, body, _ = await call("DELETE", f"{base_url}/api/sessions/streamed/rtmp")
    assert status == 200 and body["stopped"] == 1


async def test_rtmp_url_setting_starts_the_default_broadcast_with_the_server(runtime, rtmp_server):
    """What `facecast serve --rtmp URL` does: the default broadcast session exists and streams from the start."""
    url = f"{rtmp_server}/at-launch"
    broadcast = runtime.settings.broadcast.model_copy(update={"rtmp_url": url})
    app = create_app(
        dataclasses.replace(runtime, settings=runtime.settings.model_copy(update={"broadcast": broadcast}))
    )
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        session = app[SESSIONS].broadcasts["main"]
        deadline = time.monotonic() + 20
        while session.pushers[0].status != "live":
            assert time.monotonic() < deadline, session.pushers[0].describe()
            await asyncio.sleep(0.2)
        found = await asyncio.wait_for(asyncio.to_thread(read_stream, url, 1.0), 30)
        assert found["codecs"] == ["audio:aac", "video:h264"] and found["video_frames"] > 0, found
    finally:
        await runner.cleanup()
    assert app[SESSIONS].broadcasts == {}

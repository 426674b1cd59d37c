"""Nothing a client sends can break a session, bypass a limit or reach the API from another site.

Real server, real aiortc peers, and raw HTTP where a client library would refuse to send the bytes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtcsctptransport import WEBRTC_STRING

from media_server.cli.main import _settings, build_parser
from media_server.http.state import METRICS, SESSIONS
from media_server.media.webrtc import rtc_configuration
from media_server.runtime import Runtime
from media_server.testing.harness import runtime_served
from media_server.testing.loopback_client import LoopbackClient


async def raw_request(base_url: str, request: bytes) -> tuple[int, str, dict]:
    """Send ``request`` byte for byte; the status, content type and JSON body of the answer."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers.get("content-type", ""), json.loads(body) if body else {}


async def an_offer() -> tuple[RTCPeerConnection, str]:
    """A real aiortc offer, every candidate gathered (the caller closes the peer)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


@contextlib.asynccontextmanager
async def server(runtime: Runtime, **overrides: object) -> AsyncIterator[tuple[str, web.Application]]:
    """A server of its own, on the shared engines, with these server settings changed."""
    settings = runtime.settings.model_copy(
        update={"server": runtime.settings.server.model_copy(update=overrides)}
    )
    async with runtime_served(dataclasses.replace(runtime, settings=settings)) as (base_url, app):
        yield base_url, app


# --- 1. capacity --------------------------------------------------------------------------------


async def test_simultaneous_offers_open_exactly_max_sessions_and_the_rest_get_503(runtime) -> None:
    peers_and_offers = [await an_offer() for _ in range(8)]
    async with server(runtime, max_sessions=3, offers_per_minute=0) as (base_url, app):
        async with aiohttp.ClientSession() as http:

            async def post(sdp: str) -> tuple[int, dict, dict]:
                async with http.post(f"{base_url}/offer", json={"sdp": sdp, "type": "offer"}) as response:
                    return response.status, await response.json(), dict(response.headers)

            results = await asyncio.gather(*(post(sdp) for _, sdp in peers_and_offers))
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200] * 3 + [503] * 5
        assert all(int(headers["Retry-After"]) > 0 for status, _, headers in results if status == 503)
        registry = app[SESSIONS]
        assert len(registry.talks) == registry.open_sessions == 3
        assert app[METRICS].sessions._value.get() == 3
    for pc, _ in peers_and_offers:
        await pc.close()


# --- 2. the data channel ----------------------------------------------------------------------


def adversarial_messages(rng: random.Random) -> list[str | bytes]:
    messages: list[str | bytes] = [
        "[" * 60_000,
        "{" * 30_000,
        '{"type": "text", "text": ' + "[" * 20_000 + "}",
        "x" * 60_000,
        b"\x00\xff" * 1000,
        "",
        b"",
        "null",
        "[]",
        '"text"',
        '{"type": 7}',
        '{"type": null}',
        '{"type": ["text"]}',
        '{"type": "text"}',
        '{"type": "text", "text": 12}',
        '{"type": "text", "text": "   "}',
        '{"type": "text", "text": "' + "a" * 3000 + '"}',
        '{"type": "say", "text": "nul\\u0000here"}',
        '{"type": "say", "text": "lone \\ud800 surrogate"}',
        '{"type": "hello"}',
        '{"type": "' + "t" * 5000 + '"}',
        '{"type": "interrupt", "extra": {"a": [1, 2, {"b": null}]}}',
        "\U0001f600" * 100,
    ]
    for _ in range(250):
        kind = rng.randrange(4)
        if kind == 0:
            messages.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        elif kind == 1:
            messages.append("".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 200))))
        elif kind == 2:
            messages.append(json.dumps({"type": rng.choice(["text", "say", "ping", "interrupt", "x"]), "text": rng.random()}))
        else:
            messages.append("{" + '"a":' * rng.randrange(1, 50))
    return messages


def send_invalid_utf8_string(client: LoopbackClient, payload: bytes) -> None:
    """A *string* message whose bytes are not UTF-8: no client library sends that, so it is queued raw."""
    channel = client._channel
    transport = channel.transport
    transport._data_channel_queue.append((channel, WEBRTC_STRING, payload))
    asyncio.ensure_future(transport._data_channel_flush())


async def test_no_message_breaks_a_session_or_reaches_another(client_factory, server_app) -> None:
    target, bystander = await client_factory(), await client_factory()
    rng = random.Random(7)
    messages = adversarial_messages(rng)
    for index, message in enumerate(messages):
        target._channel.send(message)
        if index % 40 == 0:
            send_invalid_utf8_string(target, b"\xff\xfe{\"type\": \"text\"}")
            await asyncio.sleep(0.05)
    target.send({"type": "ping"})
    await target.wait_for(lambda e: e.get("type") == "pong", timeout=30)
    errors = target.events_of("error")
    assert errors and {e["code"] for e in errors} <= {"bad_message"}
    assert not any("Traceback" in e["message"] for e in errors)
    # The session still answers a question; the other one heard nothing of any of it.
    asked = time.monotonic()
    target.send({"type": "text", "text": "What is the capital of France?"})
    reply = await target.wait_for(lambda e: e.get("type") == "reply" and e.get("final"), timeout=60, after=asked)
    assert reply["text"]
    assert [e["type"] for _, e in bystander.events] == ["session", "state"]
    assert target.session_id in server_app[SESSIONS].talks


# --- 3, 4, 5: hosts, headers, ids ---------------------------------------------------------------


async def test_requests_for_other_host_names_are_refused_so_dns_rebinding_reaches_nothing(base_url) -> None:
    port = base_url.rsplit(":", 1)[1]
    evil = f"evil.example:{port}"
    for method, path, body in (("POST", "/api/sessions", b"{}"), ("POST", "/offer", b"{}"), ("GET", "/healthz", b"")):
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: {evil}\r\nOrigin: http://{evil}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        status, content_type, payload = await raw_request(base_url, request)
        assert status == 403 and content_type.startswith("application/json")
        assert payload["error"]["code"] == "host_not_allowed" and "server.allowed_hosts" in payload["error"]["message"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        assert (await raw_request(base_url, request))[0] == 200


async def test_a_name_in_allowed_hosts_is_served(runtime) -> None:
    async with server(runtime, allowed_hosts=["avatar.example.com"]) as (base_url, _):
        request = b"GET /healthz HTTP/1.1\r\nHost: avatar.example.com\r\nConnection: close\r\n\r\n"
        assert (await raw_request(base_url, request))[0] == 200


@pytest.mark.parametrize(
    "header",
    [b"Origin: http://[evil", b"Host: [not-an-address", b"Host: example.com:port"],
)
async def test_malformed_headers_get_a_400_json_error_on_any_path(base_url, header: bytes) -> None:
    host = b"" if header.startswith(b"Host") else b"Host: 127.0.0.1\r\n"
    request = b"GET /healthz HTTP/1.1\r\n" + host + header + b"\r\nConnection: close\r\n\r\n"
    status, content_type, payload = await raw_request(base_url, request)
    assert status == 400 and content_type.startswith("application/json") and payload["error"]["code"] == "bad_header"


async def test_a_token_that_is_not_text_gets_400_not_500(runtime) -> None:
    async with server(runtime, api_token="a-long-enough-secret-token") as (base_url, _):
        request = b"GET /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
        status, content_type, payload = await raw_request(base_url, request)
        assert status == 400 and content_type.startswith("application/json") and payload["error"]["code"] == "bad_header"


async def test_an_id_with_a_trailing_newline_is_refused_and_opens_nothing(base_url, server_app) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/api/sessions", json={"id": "nl\n"}) as response:
            assert response.status == 400 and "1 to 64 letters" in (await response.json())["error"]["message"]
    assert "nl\n" not in server_app[SESSIONS].broadcasts and server_app[SESSIONS].open_sessions == 0


# --- 6. offers that cannot connect, and how many a client may make ----------------------------------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda sdp: "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith("a=fingerprint")), "DTLS fingerprint"),
        (lambda sdp: re.sub(r"m=audio \d+ ", "m=audio port ", sdp), "could not be parsed"),
        (lambda sdp: re.sub(r"(a=candidate:\S+ 1 udp \d+ \S+) \d+", r"\1 port", sdp), "could not be parsed"),
        (lambda sdp: "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith("a=candidate")), "no ICE candidates"),
        (lambda sdp: "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith("a=ice-pwd")), "ICE credentials"),
    ],
)
async def test_offers_that_could_never_connect_are_refused_with_400(base_url, server_app, change, problem) -> None:
    pc, sdp = await an_offer()
    await pc.close()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/offer", json={"sdp": change(sdp), "type": "offer"}) as response:
            payload = await response.json()
    assert response.status == 400 and problem in payload["error"]["message"]
    assert server_app[SESSIONS].open_sessions == 0


async def test_one_address_may_make_only_so_many_offers_a_minute(runtime) -> None:
    async with server(runtime, offers_per_minute=2, max_sessions=10) as (base_url, app):
        peers = []
        async with aiohttp.ClientSession() as http:
            statuses = []
            for _ in range(3):
                pc, sdp = await an_offer()
                peers.append(pc)
                async with http.post(f"{base_url}/offer", json={"sdp": sdp, "type": "offer"}) as response:
                    statuses.append((response.status, response.headers.get("Retry-After")))
                    payload = await response.json()
        assert [s for s, _ in statuses] == [200, 200, 429] and 0 < int(statuses[2][1]) <= 61
        assert "server.offers_per_minute" in payload["error"]["message"]
        assert len(app[SESSIONS].talks) == 2
        for pc in peers:
            await pc.close()


async def test_a_session_that_never_connects_frees_its_slot_within_the_connect_timeout(runtime) -> None:
    async with server(runtime, connect_timeout_s=1.0) as (base_url, app):
        pc, sdp = await an_offer()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base_url}/offer", json={"sdp": sdp, "type": "offer"}) as response:
                assert response.status == 200  # ... and the answer is never applied
        assert len(app[SESSIONS].talks) == 1
        async with asyncio.timeout(5):
            while app[SESSIONS].talks:
                await asyncio.sleep(0.1)
        await pc.close()


# --- 7. a hung TTS worker -------------------------------------------------------------------------


async def test_a_hung_tts_worker_fails_one_turn_and_every_session_goes_on(client_factory, runtime) -> None:
    stuck, other = await client_factory(), await client_factory()
    tts = runtime.engines.tts
    voice = tts.engine_for(tts.default_voice)  # the engine speaking the default voice, in its worker process
    [worker] = voice.worker_pids
    os.kill(worker, signal.SIGSTOP)
    try:
        asked = time.monotonic()
        stuck.send({"type": "say", "text": "This sentence meets a stopped worker."})
        error = await stuck.wait_for(lambda e: e.get("type") == "error", timeout=30, after=asked)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    assert error["code"] == "turn_failed" and "tts.reply_timeout_s" in error["message"]
    await stuck.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "listening", 10, asked)
    for client in (other, stuck):  # the spare worker answers at once, in any session
        sent = time.monotonic()
        client.send({"type": "say", "text": "Still here."})
        await client.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "speaking", 30, sent)
    assert voice.worker_pids != [worker]


# --- 8. no outbound request by default ------------------------------------------------------------


async def test_with_no_ice_servers_configured_the_server_uses_none_and_answers_with_host_candidates(base_url, runtime) -> None:
    assert rtc_configuration(runtime.settings).iceServers == []
    pc, sdp = await an_offer()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/offer", json={"sdp": sdp, "type": "offer"}) as response:
            payload = await response.json()
        async with http.delete(f"{base_url}/sessions/{payload['session_id']}") as response:
            assert response.status == 200
    await pc.close()
    answer = payload["sdp"]
    candidates = [line for line in answer.split("\r\n") if line.startswith("a=candidate")]
    assert candidates and all(" typ host" in line for line in candidates)


# --- 9. the smaller ones --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/static/%252e%252e/x", "/static/....//x", "/static/..\\x", "/static/nothing.js"])
async def test_missing_static_files_get_the_json_404(base_url, path: str) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    status, content_type, payload = await raw_request(base_url, request)
    assert status in (403, 404) and content_type.startswith("application/json") and "error" in payload


@pytest.mark.parametrize("text", ["nul\u0000here", "lone \ud800 surrogate"])
async def test_texts_with_nul_or_lone_surrogates_are_refused(base_url, text: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/api/sessions", json={"id": "clean"}) as response:
            assert response.status == 201
        try:
            body = json.dumps({"text": text}).encode()
            headers = {"Content-Type": "application/json"}
            async with http.post(f"{base_url}/api/sessions/clean/say", data=body, headers=headers) as response:
                payload = await response.json()
            assert response.status == 400 and "control characters or invalid Unicode" in payload["error"]["message"]
        finally:
            async with http.delete(f"{base_url}/api/sessions/clean"):
                pass


async def test_rtmp_pushes_per_broadcast_are_capped(base_url, runtime) -> None:
    limit = runtime.settings.broadcast.max_rtmp_pushes
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/api/sessions", json={"id": "capped"}) as response:
            assert response.status == 201
        try:
            statuses = []
            for n in range(limit + 1):
                url = f"rtmp://127.0.0.1:9/live/{n}"  # nothing listens: the pushes only count
                async with http.post(f"{base_url}/api/sessions/capped/rtmp", json={"rtmp_url": url}) as response:
                    statuses.append(response.status)
                    payload = await response.json()
            assert statuses == [201] * limit + [409] and "broadcast.max_rtmp_pushes" in payload["error"]["message"]
        finally:
            async with http.delete(f"{base_url}/api/sessions/capped"):
                pass


def test_set_works_before_and_after_the_command() -> None:
    args = build_parser().parse_args(["--set", "server.port=9001", "serve", "--set", "server.max_sessions=7"])
    settings = _settings(args)
    assert settings.server.port == 9001 and settings.server.max_sessions == 7


# --- churn ---------------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_connecting_and_leaving_over_and_over_leaves_nothing_behind(base_url, server_app) -> None:
    async def cycle() -> None:
        client = LoopbackClient(base_url)
        await client.connect()
        client.send({"type": "say", "text": "Hi."})
        await client.close()
        async with asyncio.timeout(15):
            while client.session_id in server_app[SESSIONS].talks:
                await asyncio.sleep(0.05)

    await cycle()  # the first session starts what every later one reuses (thread pools, codecs)
    threads, fds = threading.active_count(), open_fds()
    for _ in range(20):
        await cycle()
    await asyncio.sleep(1.0)
    assert server_app[SESSIONS].open_sessions == 0 and server_app[METRICS].sessions._value.get() == 0
    assert threading.active_count() <= threads + 2 and open_fds() <= fds + 4


# --- supervision ----------------------------------------------------------------------------------


async def test_a_session_whose_task_dies_says_so_and_frees_its_slot(client_factory, server_app) -> None:
    broken, other = await client_factory(), await client_factory()
    session = server_app[SESSIONS].talks[broken.session_id]

    async def failing_tick() -> None:
        raise RuntimeError("the output clock broke")

    session.output.play_tick = failing_tick  # the running clock calls it on its next tick
    error = await broken.wait_for(lambda e: e.get("type") == "error", timeout=10)
    assert error["code"] == "session_failed" and "the output clock broke" in error["message"]
    async with asyncio.timeout(10):
        while broken.session_id in server_app[SESSIONS].talks:
            await asyncio.sleep(0.05)
    assert session.closed and session.pc.connectionState == "closed"
    other.send({"type": "ping"})
    await other.wait_for(lambda e: e.get("type") == "pong", timeout=10)

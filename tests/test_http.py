"""Signalling and session control over real HTTP: every bad input gets a clear JSON error."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from engines.base import LLMEngine
from media_server.http.state import SESSIONS
from tests.conftest import MAX_TEST_SESSIONS


async def post(base_url: str, path: str, **kwargs) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as http, http.post(base_url + path, **kwargs) as response:
        return response.status, await response.json(), dict(response.headers)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("{not json", "not JSON"),
        ('["offer"]', "JSON object"),
        ('{"type": "offer"}', "string \\\"sdp\\\"".replace("\\", "")),
        ('{"sdp": "hello", "type": "offer"}', "not a session description"),
        ('{"sdp": "v=0\\r\\nm=audio 9 UDP/TLS/RTP/SAVPF 111\\r\\n", "type": "offer"}', "no DTLS fingerprint"),
        ('{"sdp": "v=0", "type": "answer"}', '"type": "offer"'),
    ],
)
async def test_malformed_offers_get_400(base_url, body, fragment):
    status, payload, _ = await post(base_url, "/offer", data=body, headers={"Content-Type": "application/json"})
    assert status == 400
    assert fragment in payload["error"]["message"]


async def test_oversized_body_gets_413(base_url, runtime):
    status, payload, _ = await post(base_url, "/offer", data=b"x" * (runtime.settings.server.max_body_bytes + 1))
    assert status == 413 and payload["error"]["code"] == "too_large"


@pytest.mark.parametrize(("field", "available"), [("avatar", "default"), ("persona", "assistant"), ("voice", "joe")])
async def test_unknown_choices_get_404_naming_the_available_ones(base_url, field, available):
    status, payload, _ = await post(base_url, "/offer", json={"sdp": "v=0\r\nm=audio\r\n", "type": "offer", field: "nope"})
    assert status == 404
    assert f"unknown {field} 'nope'" in payload["error"]["message"] and available in payload["error"]["message"]


async def test_more_sessions_than_configured_get_503_with_retry_after(client_factory, base_url):
    for _ in range(MAX_TEST_SESSIONS):
        await client_factory()
    with pytest.raises(RuntimeError, match="503"):
        await client_factory()
    status, payload, headers = await post(base_url, "/offer", json={"sdp": "v=0\r\nm=audio\r\n", "type": "offer"})
    assert status == 503 and int(headers["Retry-After"]) > 0 and payload["error"]["code"] == "server_full"


async def test_delete_ends_a_session_and_releases_it(client_factory, base_url, server_app):
    client = await client_factory()
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{base_url}/sessions/{client.session_id}") as response:
            assert response.status == 200
        async with http.delete(f"{base_url}/sessions/{client.session_id}") as response:
            assert response.status == 404
    assert client.session_id not in server_app[SESSIONS].talks


async def test_a_vanished_client_is_cleaned_up_within_seconds(client_factory, server_app, runtime):
    client = await client_factory()
    session = server_app[SESSIONS].talks[client.session_id]
    client.microphone.stop()  # the client stops sending anything, without saying goodbye
    for reader in client._readers:
        reader.cancel()
    deadline = time.monotonic() + runtime.settings.server.client_timeout_s + 5
    while client.session_id in server_app[SESSIONS].talks and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    assert client.session_id not in server_app[SESSIONS].talks
    assert session.closed and session.pc.connectionState == "closed"


class BrokenLLM(LLMEngine):
    """Fault injection: an engine that fails, to show the failure stays inside its session."""

    def stream_reply(self, persona, history, cancelled, context=""):
        raise RuntimeError("the model file is corrupt")
        yield ""  # pragma: no cover - makes this a generator


async def test_an_engine_failure_is_reported_to_its_session_only(client_factory, server_app):
    broken, healthy = await client_factory(), await client_factory()
    conversation = server_app[SESSIONS].talks[broken.session_id].conversation
    conversation.replier.llm = BrokenLLM()
    broken.send({"type": "text", "text": "Hello?"})
    healthy.send({"type": "text", "text": "What is the capital of France?"})
    error = await broken.wait_for(lambda e: e.get("type") == "error", timeout=20)
    assert error["code"] == "turn_failed" and "corrupt" in error["message"]
    failed_at = next(at for at, e in broken.events if e is error)
    await broken.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "listening", 10, failed_at)
    reply = await healthy.wait_for(lambda e: e.get("type") == "reply" and e.get("final"), timeout=30)
    assert reply["text"] and not healthy.events_of("error")


async def test_health_and_prometheus_metrics(base_url, client_factory):
    client = await client_factory()
    client.send({"type": "text", "text": "Hi there!"})
    await client.wait_for(lambda e: e.get("type") == "metrics", timeout=30)
    async with aiohttp.ClientSession() as http:
        async with http.get(base_url + "/healthz") as response:
            health = await response.json()
            assert response.status == 200 and health["status"] == "ok"
            engines = {"vad": "silero", "asr": "faster-whisper", "llm": "llama-cpp", "tts": "combined", "lipsync": "warp"}
            assert health["engines"] == engines
        async with http.get(base_url + "/metrics") as response:
            text = await response.text()
    assert 'facecast_stage_latency_seconds_bucket{le="1.0",stage="first_audio_sent"}' in text
    for name in ("facecast_sessions ", "facecast_turns_total", "facecast_frames_sent_total", "facecast_barge_in_seconds"):
        assert name in text


async def test_unknown_routes_are_json_404(base_url):
    async with aiohttp.ClientSession() as http, http.get(base_url + "/nowhere") as response:
        assert response.status == 404 and "error" in await response.json()

"""Live WebRTC sessions whose engines are other servers, all real and on loopback:

- llm.engine = "openai" on llama-cpp-python's own server (the embedded Gemma): a spoken question gets a
  spoken answer, and a barge-in makes the server stop generating;
- a second Facecast process whose ASR and TTS are the first one's /v1/audio/... APIs answers a spoken
  question end to end;
- an LLM server that is down, silent, or sends garbage mid-reply: the turn fails with an ``error`` event,
  the session stays usable, and the next turn works once the server is back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web

from engines.llm.openai import OpenAILLM
from media_server.http.app import create_app
from media_server.config import PersonaSettings
from media_server.runtime import Runtime, profiles_from
from media_server.testing.llama_server import LlamaServer, running_llama_server
from media_server.testing.loopback_client import LoopbackClient
from media_server.testing.processes import free_port
from media_server.testing.servers import served
from media_server.testing.speech_corpus import espeak, word_error_rate
from tests.browser_support import ServerProcess
from tests.test_openai_engines import SERVER_SAW_CLIENT_GO, event_stream, model_server, sse_chunk

QUESTION = "What is the capital of France?"
STORY = "Tell me a story about a dragon."
LONG_REPLY_TOKENS = 1500  # the storyteller goes on until max_tokens (~30 s of generation): long enough to be interrupted
# The default personas are taught to answer in a sentence or two; this one, by its example, at length.
STORYTELLER = PersonaSettings(
    display_name="Storyteller",
    system_prompt="The storyteller tells long, detailed stories with many events.",
    examples=[
        (
            "Tell me a story about a cat.",
            "Once upon a time, in a little village by the sea, there lived a grey cat called Tom. Every morning Tom"
            " walked down to the harbour to watch the fishing boats come home. One day a storm came, and the boats"
            " did not return. Tom waited on the pier all night, through the wind and the rain. At dawn he saw a"
            " light far out on the water, and he ran along the pier, meowing as loud as he could, so the fishermen"
            " could find their way to the harbour. From that day on, the whole village called him Tom the"
            " Lighthouse Cat, and every fisherman brought him a fish.",
        )
    ],
)


def final_reply(event: dict) -> bool:
    return event.get("type") == "reply" and bool(event.get("final"))


def is_state(state: str):  # noqa: ANN201
    return lambda event: event.get("type") == "state" and event.get("state") == state


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


def with_llm(runtime: Runtime, llm: OpenAILLM) -> Runtime:
    return dataclasses.replace(runtime, engines=dataclasses.replace(runtime.engines, llm=llm))


def with_storyteller(runtime: Runtime) -> Runtime:
    settings = runtime.settings.model_copy(update={"personas": {**runtime.settings.personas, "storyteller": STORYTELLER}})
    return dataclasses.replace(runtime, settings=settings, personas=profiles_from(settings))


@pytest_asyncio.fixture
async def connect() -> AsyncIterator:
    """Connect loopback WebRTC clients to a server; each is closed after the test."""
    clients: list[LoopbackClient] = []

    async def connected(base_url: str, **choices: str) -> LoopbackClient:
        client = LoopbackClient(base_url)
        clients.append(client)
        await client.connect(**choices)
        return client

    yield connected
    for client in clients:
        await client.close()


async def spoken_answer(client: LoopbackClient, after: float) -> tuple[dict, np.ndarray]:
    """The reply the avatar speaks after ``after``, and the audio the client heard of it."""
    reply = await client.wait_for(final_reply, timeout=60, after=after)
    speaking = await client.wait_for(is_state("speaking"), timeout=60, after=after)
    speaking_at = next(at for at, e in client.events if e is speaking)
    await client.wait_for(is_state("listening"), timeout=60, after=speaking_at)
    return reply, client.recording.audio_between(speaking_at, time.monotonic())


# --- llm.engine = "openai" on llama.cpp's own server ---------------------------------------------------


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    with running_llama_server() as server:
        yield server


async def test_a_spoken_turn_and_a_barge_in_with_the_llm_on_llama_cpps_server(
    runtime: Runtime, llama_server: LlamaServer, connect
) -> None:
    llm = OpenAILLM(OpenAILLM.Settings(base_url=llama_server.base_url, max_tokens=LONG_REPLY_TOKENS, temperature=0.0))
    try:
        async with served(create_app(with_storyteller(with_llm(runtime, llm)))) as base_url:
            client = await connect(base_url)
            asked = time.monotonic()
            client.microphone.say(*espeak(QUESTION))
            transcript = await client.wait_for(lambda e: e.get("type") == "transcript" and e.get("final"), 30, asked)
            assert word_error_rate(QUESTION, transcript["text"]) <= 0.2, transcript["text"]
            reply, heard = await spoken_answer(client, asked)
            assert "paris" in reply["text"].lower() and rms(heard) > 0.02, reply["text"]

            storyteller = await connect(base_url, persona="storyteller")
            disconnects = llama_server.lines_with(SERVER_SAW_CLIENT_GO)
            sent = time.monotonic()
            storyteller.send({"type": "text", "text": STORY})
            speaking = await storyteller.wait_for(is_state("speaking"), timeout=60, after=sent)
            speaking_at = next(at for at, e in storyteller.events if e is speaking)
            await asyncio.sleep(1.0)
            storyteller.microphone.say(*espeak("Stop, please stop.", words_per_minute=150))
            interrupted = await storyteller.wait_for(lambda e: e.get("type") == "interrupted", 20, speaking_at)
            assert interrupted["reason"] == "barge-in"
            # The server itself says the client went away: it stopped generating the story.
            assert await asyncio.to_thread(llama_server.wait_for_lines_with, SERVER_SAW_CLIENT_GO, disconnects + 1, 10)
            assert not client.events_of("error") and not storyteller.events_of("error")
    finally:
        llm.close()


# --- a second Facecast whose ears and voice are the first one's -----------------------------------------


@pytest.fixture(scope="module")
def facecast_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    logs = tmp_path_factory.mktemp("facecast-pair")
    first = ServerProcess(logs / "first.log")
    first.start()
    api = f"http://127.0.0.1:{first.port}/v1"
    second = ServerProcess(
        logs / "second.log",
        args=(
            # Facecast's /v1/models lists its personas: the model names these APIs take (any) must be given.
            "--set", "asr.engine=openai", "--set", f"asr.base_url={api}", "--set", "asr.model=whisper-1",
            "--set", "tts.engine=openai", "--set", f"tts.base_url={api}", "--set", "tts.model=tts-1",
            "--set", 'tts.voices=["joe"]', "--set", "tts.default_voice=joe", "--set", "tts.response_format=pcm",
        ),
    )  # fmt: skip
    try:
        second.start()
        yield first, second
    finally:
        second.stop()
        first.stop()


async def test_a_facecast_whose_asr_and_tts_are_another_facecast_answers_a_spoken_question(
    facecast_pair: tuple[ServerProcess, ServerProcess], connect
) -> None:
    first, second = facecast_pair
    client = await connect(second.base_url)
    asked = time.monotonic()
    client.microphone.say(*espeak(QUESTION))
    transcript = await client.wait_for(lambda e: e.get("type") == "transcript" and e.get("final"), 60, asked)
    assert word_error_rate(QUESTION, transcript["text"]) <= 0.2, transcript["text"]
    reply, heard = await spoken_answer(client, asked)
    assert reply["text"] and rms(heard) > 0.02
    log = Path(second.log_path).read_text()
    assert "asr engine 'openai' ready" in log and "tts engine 'openai' ready" in log, log[-2000:]


# --- an LLM server that fails, then comes back ------------------------------------------------------------


async def _failing_then_answering(failure: str, request: web.Request, seen) -> web.StreamResponse:  # noqa: ANN001
    response = await event_stream(request)
    if seen.go_on.is_set():  # the server is back
        for text in ("Paris", " is", " the", " capital."):
            await response.write(sse_chunk(text))
        await response.write(sse_chunk(finish="stop") + b"data: [DONE]\n\n")
    elif failure == "slow":
        await asyncio.sleep(60)
    else:
        await response.write(sse_chunk("Hello"))
        await response.write(b"<html>502 Bad Gateway</html>\n\n")
    return response


@pytest.mark.parametrize("failure", ["down", "slow", "garbage"])
async def test_a_failing_llm_server_fails_the_turn_visibly_and_the_next_turn_works(
    runtime: Runtime, connect, failure: str
) -> None:
    port = free_port()
    app, seen = model_server("chat/completions", partial(_failing_then_answering, failure))
    settings = OpenAILLM.Settings(base_url=f"http://127.0.0.1:{port}/v1", model="m", retries=0, first_token_timeout_s=2)
    llm = OpenAILLM(settings)
    try:
        async with served(create_app(with_llm(runtime, llm))) as base_url:
            client = await connect(base_url)
            if failure == "down":
                asked = time.monotonic()
                client.send({"type": "text", "text": QUESTION})
                error = await client.wait_for(lambda e: e.get("type") == "error", timeout=30, after=asked)
                await client.wait_for(is_state("listening"), timeout=30, after=asked)
                async with served(app, port):
                    seen.go_on.set()
                    await _next_turn_works(client)
            else:
                async with served(app, port):
                    asked = time.monotonic()
                    client.send({"type": "text", "text": QUESTION})
                    error = await client.wait_for(lambda e: e.get("type") == "error", timeout=30, after=asked)
                    await client.wait_for(is_state("listening"), timeout=30, after=asked)
                    seen.go_on.set()
                    await _next_turn_works(client)
    finally:
        llm.close()
    assert error["code"] == "turn_failed" and "LLM server" in error["message"], error


async def _next_turn_works(client: LoopbackClient) -> None:
    asked = time.monotonic()
    client.send({"type": "text", "text": QUESTION})
    reply, heard = await spoken_answer(client, asked)
    assert reply["text"] == "Paris is the capital." and rms(heard) > 0.02


async def test_a_streaming_chat_client_that_goes_away_stops_the_llm_server(
    runtime: Runtime, llama_server: LlamaServer
) -> None:
    """Facecast's /v1/chat/completions on llm.engine = "openai": the client reads three chunks and closes
    the connection; Facecast stops its own request, and llama.cpp's server says so."""
    llm = OpenAILLM(OpenAILLM.Settings(base_url=llama_server.base_url, max_tokens=LONG_REPLY_TOKENS, temperature=0.0))
    body = {"model": "assistant", "messages": [{"role": "user", "content": STORY}], "stream": True}
    disconnects = llama_server.lines_with(SERVER_SAW_CLIENT_GO)
    try:
        async with served(create_app(with_llm(runtime, llm))) as base_url:
            async with aiohttp.ClientSession() as http, http.post(f"{base_url}/v1/chat/completions", json=body) as response:
                events = [await response.content.readuntil(b"\n\n") for _ in range(3)]
            assert all(event.startswith(b"data: {") for event in events)
            assert await asyncio.to_thread(llama_server.wait_for_lines_with, SERVER_SAW_CLIENT_GO, disconnects + 1, 10)
    finally:
        llm.close()

"""The openai engines against real servers on loopback: llama-cpp-python's own OpenAI-compatible server
on the embedded Gemma, and small aiohttp servers that misbehave on purpose or that answer speech
requests with the real embedded Whisper and the real Piper voice, so real speech crosses the wire."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import struct
import threading
import time
import wave
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from engines.asr.faster_whisper import FasterWhisperASR
from engines.asr.openai import OpenAIASR
from engines.audio import resample
from engines.base import ChatMessage, EngineConfigError, Persona
from engines.llm.openai import OpenAILLM, recent_history
from engines.openai_compatible import RemoteServerError
from engines.registry import create_engine
from engines.tts.openai import OpenAITTS
from engines.tts.piper.engine import PiperTTS
from media_server.config import load_settings
from media_server.testing import servers
from media_server.testing.llama_server import LlamaServer, running_llama_server
from media_server.testing.processes import free_port
from media_server.testing.speech_corpus import espeak, word_error_rate
from media_server.threads import iterate_in_thread

PERSONA = Persona(
    name="assistant",
    display_name="Ava",
    system_prompt="Ava is a friendly assistant who answers in one short sentence.",
    examples=(("What is the capital of Italy?", "The capital of Italy is Rome."),),
)
QUESTION = [ChatMessage("user", "What is the capital of France?")]
SECRET = "sk-test-9f8e7d6c5b4a39281706"
SERVER_SAW_CLIENT_GO = "Disconnected from client"  # llama_cpp.server's own words, when it stops a reply
LONG_REPLY_TOKENS = 1500  # the base model loops on the llama-2 chat format until max_tokens
PIPER_RATE = 22050


# --- a real aiohttp server on loopback -------------------------------------------------------


@contextlib.contextmanager
def serving(app: web.Application) -> Iterator[str]:
    """``app`` served on a free loopback port; yields its API root (``.../v1``)."""
    with servers.serving(app) as root:
        yield f"{root}/v1"


@dataclass
class Seen:
    """What a test server received and did."""

    headers: list[dict[str, str]] = field(default_factory=list)  # of every request, /models included
    requests: int = 0  # to the model endpoint
    bodies: list[Any] = field(default_factory=list)
    sent: list[np.ndarray] = field(default_factory=list)
    abandoned: int = 0  # answers whose client closed the connection
    go_on: threading.Event = field(default_factory=threading.Event)


Handler = Callable[[web.Request, Seen], Awaitable[web.StreamResponse]]


def model_server(
    path: str, handler: Handler, models: tuple[str, ...] = ("test-model",)
) -> tuple[web.Application, Seen]:
    """An app serving ``handler`` at ``/v1/<path>`` and ``models`` at /v1/models, and what it sees."""
    app, seen = web.Application(), Seen()

    async def counted(request: web.Request) -> web.StreamResponse:
        seen.headers.append(dict(request.headers))
        seen.requests += 1
        return await handler(request, seen)

    async def listed(request: web.Request) -> web.Response:
        seen.headers.append(dict(request.headers))
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

    app.router.add_post(f"/v1/{path}", counted)
    app.router.add_get("/v1/models", listed)
    return app, seen


async def event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


def sse_chunk(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


def remote_llm(base_url: str, **options: object) -> OpenAILLM:
    return OpenAILLM(OpenAILLM.Settings(base_url=base_url, **options))


# --- LLM against llama.cpp's own OpenAI-compatible server ----------------------------------


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    with running_llama_server() as server:
        yield server


def test_streams_a_reply_from_the_servers_only_model(llama_server: LlamaServer) -> None:
    llm = remote_llm(llama_server.base_url, max_tokens=24, temperature=0.0)
    try:
        deltas = list(llm.stream_reply(PERSONA, QUESTION, lambda: False))
        description = llm.describe()
    finally:
        llm.close()
    assert len(deltas) >= 3, deltas
    assert "".join(deltas).strip()
    (served,) = llama_server.models()
    assert description["model"] == f"auto: the server's only model ({served})"
    assert description["models"] == served and description["server"].startswith("reachable")


def _eval_ms_per_token(server_output: str) -> float:
    """llama.cpp's own time per generated token in the server's last finished request."""
    timings = re.findall(
        r"^llama_perf_context_print:\s+eval time =\s+([\d.]+) ms /\s+(\d+) runs", server_output, re.MULTILINE
    )
    milliseconds, runs = timings[-1]
    return float(milliseconds) / int(runs)


@pytest.mark.parametrize("how", ["cancelled", "closed"])
def test_barge_in_stops_the_server_generating(llama_server: LlamaServer, how: str) -> None:
    """A reply asked for LONG_REPLY_TOKENS tokens is abandoned after three deltas; the server reports
    the client gone, and a second request, which the server serves only after the first, is answered
    in a fraction of the time the long reply would have taken."""
    llm = remote_llm(llama_server.base_url, max_tokens=LONG_REPLY_TOKENS, temperature=0.0)
    disconnects = llama_server.lines_with(SERVER_SAW_CLIENT_GO)
    try:
        if how == "cancelled":  # the media server's path: the turn's task is cancelled
            _first_deltas_then_cancel(llm, 3)
        else:
            reply = llm.stream_reply(PERSONA, QUESTION, lambda: False)
            assert len([next(reply) for _ in range(3)]) == 3
            reply.close()
        abandoned = time.monotonic()
        short = remote_llm(llama_server.base_url, max_tokens=8)
        try:
            assert "".join(short.stream_reply(PERSONA, QUESTION, lambda: False)).strip()
        finally:
            short.close()
        answered_after = time.monotonic() - abandoned
    finally:
        llm.close()
    assert llama_server.wait_for_lines_with(SERVER_SAW_CLIENT_GO, disconnects + 1, timeout_s=5)
    long_reply_s = LONG_REPLY_TOKENS * _eval_ms_per_token(llama_server.output()) / 1000
    assert answered_after < long_reply_s / 4, (answered_after, long_reply_s)


def _first_deltas_then_cancel(llm: OpenAILLM, count: int) -> None:
    """Take ``count`` deltas through ``iterate_in_thread``, then cancel it as a barge-in does."""

    async def consume() -> None:
        deltas = iterate_in_thread(lambda cancelled: llm.stream_reply(PERSONA, QUESTION, cancelled.is_set))
        async with contextlib.aclosing(deltas):
            received = 0
            async for _ in deltas:
                received += 1
                if received == count:
                    break

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(consume())
        for worker in threading.enumerate():  # it hands the loop its last item after the cancellation
            if worker.name == "iterate-in-thread":
                worker.join(5)
    finally:
        loop.close()


def test_server_killed_mid_reply_is_an_error() -> None:
    with running_llama_server() as server:
        llm = remote_llm(server.base_url, max_tokens=LONG_REPLY_TOKENS, retries=3)
        try:
            reply = llm.stream_reply(PERSONA, QUESTION, lambda: False)
            next(reply)
            server.process.kill()
            with pytest.raises(RemoteServerError, match="closed the connection before its answer was complete"):
                list(reply)
        finally:
            llm.close()


def test_server_down_fails_fast_and_the_engine_still_loads(caplog: pytest.LogCaptureFixture) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    llm = remote_llm(base_url, retries=1)
    try:
        llm.warm_up()  # a warning, not a failure: the server may come up later
        assert f"cannot reach the LLM server at {base_url}" in caplog.text and "llm.base_url" in caplog.text
        started = time.monotonic()
        with pytest.raises(RemoteServerError, match=re.escape(f"cannot reach the LLM server at {base_url}")):
            list(llm.stream_reply(PERSONA, QUESTION, lambda: False))
        assert time.monotonic() - started < 3
        assert llm.describe()["server"].startswith("not reachable")
    finally:
        llm.close()


# --- LLM against servers that misbehave --------------------------------------------------------


async def _one_delta_then_garbage(garbage: bytes, request: web.Request, seen: Seen) -> web.StreamResponse:
    response = await event_stream(request)
    await response.write(sse_chunk("Hello"))
    await response.write(garbage)
    await response.write(sse_chunk(" there", finish="stop") + b"data: [DONE]\n\n")
    return response


@pytest.mark.parametrize(
    ("garbage", "message"),
    [
        (b"<html>502 Bad Gateway</html>\n\n", "not a server-sent event"),
        (b'data: {"choices": [{"delta": \n\n', "not a chat completion chunk"),
        (b"data: \xff\xfe\xfd\n\n", "not a stream of events"),
        (b'data: {"error": {"message": "out of memory"}}\n\n', "failed mid-reply: out of memory"),
    ],
    ids=["html", "broken-json", "not-utf8", "error-event"],
)
def test_garbage_mid_stream_is_an_error(garbage: bytes, message: str) -> None:
    app, seen = model_server("chat/completions", partial(_one_delta_then_garbage, garbage))
    with serving(app) as base_url:
        llm = remote_llm(base_url, retries=2)
        try:
            reply = llm.stream_reply(PERSONA, QUESTION, lambda: False)
            assert next(reply) == "Hello"
            with pytest.raises(RemoteServerError, match=re.escape(message)):
                list(reply)
        finally:
            llm.close()
    assert seen.requests == 1  # never tried again once text had arrived


async def _cut_after_one_delta(cut: str, request: web.Request, seen: Seen) -> web.StreamResponse:
    response = await event_stream(request)
    await response.write(sse_chunk("Hello"))
    if cut == "connection":
        request.transport.close()
    return response  # "ended": the body ends properly, with neither a finish_reason nor [DONE]


@pytest.mark.parametrize(
    ("cut", "message"),
    [("connection", "closed the connection before"), ("ended", "ended the reply stream before the reply was complete")],
)
def test_a_reply_cut_short_is_an_error_and_not_retried(cut: str, message: str) -> None:
    app, seen = model_server("chat/completions", partial(_cut_after_one_delta, cut))
    with serving(app) as base_url:
        llm = remote_llm(base_url, retries=3)
        try:
            with pytest.raises(RemoteServerError, match=message):
                list(llm.stream_reply(PERSONA, QUESTION, lambda: False))
        finally:
            llm.close()
    assert seen.requests == 1


async def _headers_then_nothing(stall: str, request: web.Request, seen: Seen) -> web.StreamResponse:
    response = await event_stream(request)
    if stall == "after-first-token":
        await response.write(sse_chunk("Hello"))
    await asyncio.sleep(60)
    return response


@pytest.mark.parametrize(
    ("stall", "message"),
    [
        ("before-first-token", "did not answer within 0.5 s (llm.first_token_timeout_s)"),
        ("after-first-token", "stopped sending for 0.5 s (llm.read_timeout_s)"),
    ],
)
def test_a_silent_server_is_an_error_within_the_deadline(stall: str, message: str) -> None:
    app, _ = model_server("chat/completions", partial(_headers_then_nothing, stall))
    with serving(app) as base_url:
        llm = remote_llm(base_url, first_token_timeout_s=0.5, read_timeout_s=0.5, retries=0)
        started = time.monotonic()
        try:
            with pytest.raises(RemoteServerError, match=re.escape(message)):
                list(llm.stream_reply(PERSONA, QUESTION, lambda: False))
        finally:
            llm.close()
    assert time.monotonic() - started < 3


async def _unavailable_then_a_reply(request: web.Request, seen: Seen) -> web.StreamResponse:
    if seen.requests == 1:
        return web.json_response({"error": {"message": "model is loading"}}, status=503)
    response = await event_stream(request)
    for text in ("Paris", " is", " the", " capital."):
        await response.write(sse_chunk(text))
    await response.write(sse_chunk(finish="stop") + b"data: [DONE]\n\n")
    return response


def test_a_failure_before_the_first_token_is_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    app, seen = model_server("chat/completions", _unavailable_then_a_reply)
    with serving(app) as base_url:
        llm = remote_llm(base_url, retries=1)
        try:
            assert "".join(llm.stream_reply(PERSONA, QUESTION, lambda: False)) == "Paris is the capital."
        finally:
            llm.close()
    assert seen.requests == 2
    assert "503 Service Unavailable to /chat/completions: model is loading; trying again" in caplog.text


async def _recorded_reply(request: web.Request, seen: Seen) -> web.StreamResponse:
    seen.bodies.append(await request.json())
    if request.headers.get("Authorization") != f"Bearer {SECRET}":
        return web.json_response({"error": {"message": f"Incorrect API key provided: {SECRET[:8]}"}}, status=401)
    response = await event_stream(request)
    await response.write(sse_chunk("Rome.", finish="stop") + b"data: [DONE]\n\n")
    return response


def test_the_request_and_the_api_key(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The persona, its examples and the bounded history are sent as chat messages; the key goes as a
    bearer header, and never into describe() or an error, even when the server echoes it."""
    monkeypatch.setenv("FACECAST_TEST_KEY", SECRET)
    app, seen = model_server("chat/completions", _recorded_reply)
    old = [ChatMessage("user", "Tell me a long story. " * 20), ChatMessage("assistant", "Once upon a time. " * 20)]
    history = [*old, ChatMessage("user", "Hi!"), ChatMessage("assistant", "Hello!"), ChatMessage("user", "Capital?")]
    with serving(app) as base_url:
        llm = remote_llm(
            base_url, api_key_env="FACECAST_TEST_KEY", max_history_tokens=30, max_tokens=77, temperature=0.2, top_p=0.8
        )
        try:
            assert list(llm.stream_reply(PERSONA, history, lambda: False)) == ["Rome."]
            description = json.dumps(llm.describe())
        finally:
            llm.close()
        monkeypatch.setenv("FACECAST_TEST_KEY", SECRET + "-wrong")  # the server echoes part of the real key
        wrong = remote_llm(base_url, api_key_env="FACECAST_TEST_KEY")
        try:
            with pytest.raises(RemoteServerError) as failure:
                list(wrong.stream_reply(PERSONA, QUESTION, lambda: False))
        finally:
            wrong.close()
    assert all(h["Authorization"] == f"Bearer {SECRET}" for h in seen.headers[:2])
    assert SECRET not in description and "FACECAST_TEST_KEY" in description
    assert "401 Unauthorized" in str(failure.value) and "llm.api_key_env" in str(failure.value)
    assert SECRET not in str(failure.value) and SECRET not in caplog.text
    body = seen.bodies[0]
    assert body["messages"] == [
        {"role": "system", "content": PERSONA.system_prompt},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "The capital of Italy is Rome."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital?"},
    ]
    assert (body["model"], body["stream"], body["max_tokens"], body["temperature"], body["top_p"]) == (
        "test-model", True, 77, 0.2, 0.8,
    )  # fmt: skip


def test_missing_key_variable_or_a_key_in_its_place_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACECAST_TEST_KEY", raising=False)
    with pytest.raises(EngineConfigError, match="llm.api_key_env names the environment variable FACECAST_TEST_KEY"):
        remote_llm("http://127.0.0.1:1/v1", api_key_env="FACECAST_TEST_KEY")
    with pytest.raises(EngineConfigError, match="the name of an environment variable .*, not the key") as pasted:
        create_engine("llm", "openai", {"base_url": "http://127.0.0.1:1/v1", "api_key_env": SECRET})
    assert SECRET not in str(pasted.value)


def test_several_models_need_a_choice() -> None:
    app, seen = model_server("chat/completions", _unavailable_then_a_reply, models=("llama3.2", "qwen2.5"))
    with serving(app) as base_url:
        llm = remote_llm(base_url)
        try:
            with pytest.raises(
                RemoteServerError, match=r"serves 2 models \(llama3.2, qwen2.5\): name the one .* llm.model"
            ):
                list(llm.stream_reply(PERSONA, QUESTION, lambda: False))
        finally:
            llm.close()
    assert seen.requests == 0


def test_history_drops_whole_exchanges_from_the_oldest() -> None:
    history = [ChatMessage("user" if i % 2 == 0 else "assistant", f"message {i} " * 10) for i in range(9)]
    kept = recent_history(history, budget=100)
    assert kept == history[-len(kept) :] and kept[0].role == "user" and len(kept) == 3
    huge = [*history[:-1], ChatMessage("user", "a very long question " * 200)]
    assert recent_history(huge, budget=100) == huge[-1:]


def test_closed_engine_stops_its_thread_and_refuses_requests(llama_server: LlamaServer) -> None:
    def client_threads() -> int:
        return sum(thread.name == "llm-openai-client" for thread in threading.enumerate())

    before = client_threads()
    llm = remote_llm(llama_server.base_url)
    assert client_threads() == before + 1
    llm.close()
    assert client_threads() == before
    with pytest.raises(RemoteServerError, match="closed"):
        list(llm.stream_reply(PERSONA, QUESTION, lambda: False))


def test_switching_engine_in_a_config_file_drops_the_old_engines_options(tmp_path: Path) -> None:
    config = tmp_path / "remote.toml"
    config.write_text('[llm]\nengine = "openai"\nbase_url = "http://localhost:11434/v1"\nmodel = "llama3.2"\n')
    settings = load_settings(config, {"tts.engine": "openai", "tts.base_url": "http://localhost:8880/v1"}, environ={})
    assert settings.llm.options == {"base_url": "http://localhost:11434/v1", "model": "llama3.2"}
    llm = create_engine("llm", settings.llm.engine, settings.llm.options)
    tts = create_engine("tts", settings.tts.engine, settings.tts.options)
    assert isinstance(llm, OpenAILLM) and isinstance(tts, OpenAITTS)
    llm.close()
    tts.close()


# --- ASR: the real embedded Whisper behind /v1/audio/transcriptions ---------------------------


@pytest.fixture(scope="module")
def whisper() -> FasterWhisperASR:
    return FasterWhisperASR(FasterWhisperASR.Settings())


def transcription_server(whisper: FasterWhisperASR) -> tuple[web.Application, Seen]:
    """Whisper's transcript of each uploaded WAV; seen.bodies holds each form's fields and the WAV's shape."""

    async def transcribe(request: web.Request, seen: Seen) -> web.Response:
        form = await request.post()
        upload = form["file"]
        with wave.open(io.BytesIO(upload.file.read())) as wav:
            shape = (wav.getframerate(), wav.getsampwidth(), wav.getnchannels())
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        transcript = await asyncio.to_thread(whisper.transcribe, pcm.astype(np.float32) / 32768)
        fields = {name: form[name] for name in ("model", "language", "response_format") if name in form}
        seen.bodies.append({**fields, "wav": shape, "filename": upload.filename, "type": upload.content_type})
        return web.json_response({"text": transcript.text})

    return model_server("audio/transcriptions", transcribe, models=("whisper-base",))


def test_transcribes_real_speech_over_the_wire(whisper: FasterWhisperASR) -> None:
    text = "What is the tallest mountain in the world?"
    speech = resample(*espeak(text, "en-us", 160), OpenAIASR.sample_rate)
    app, seen = transcription_server(whisper)
    with serving(app) as base_url:
        asr = OpenAIASR(OpenAIASR.Settings(base_url=base_url))
        try:
            transcript = asr.transcribe(speech)
            partial_transcript = asr.transcribe(speech[: len(speech) // 2], partial=True)
            description = asr.describe()
        finally:
            asr.close()
    assert word_error_rate(text, transcript.text) <= 0.2, transcript.text
    assert transcript.language == "en" and transcript.audio_seconds == pytest.approx(len(speech) / 16000)
    assert partial_transcript.text == "" and seen.requests == 1  # no interim transcripts without local_partials
    assert seen.bodies == [
        {
            "model": "whisper-base",
            "language": "en",
            "response_format": "json",
            "wav": (16000, 2, 1),
            "filename": "utterance.wav",
            "type": "audio/wav",
        }
    ]
    assert "no interim transcripts" in description["partials"]


def test_local_partials_come_from_faster_whisper(whisper: FasterWhisperASR) -> None:
    text = "What time does the library open tomorrow morning?"
    speech = resample(*espeak(text, "en-gb", 175), OpenAIASR.sample_rate)
    app, seen = transcription_server(whisper)
    with serving(app) as base_url:
        asr = OpenAIASR(OpenAIASR.Settings(base_url=base_url, local_partials=True))
        try:
            interim = asr.transcribe(speech, partial=True)
        finally:
            asr.close()
    assert word_error_rate(text, interim.text) <= 0.2, interim.text
    assert seen.requests == 0


# --- TTS: the real Piper voice behind /v1/audio/speech -------------------------------------------


@pytest.fixture(scope="module")
def piper() -> Iterator[PiperTTS]:
    engine = PiperTTS(PiperTTS.Settings())
    yield engine
    engine.close()


def wav_header(sizes: str, data_bytes: int) -> bytes:
    """A 16-bit mono WAV header at PIPER_RATE: exact sizes, or a streamed WAV's unknown ones and a LIST chunk."""
    fmt = struct.pack("<HHIIHH", 1, 1, PIPER_RATE, PIPER_RATE * 2, 2, 16)
    if sizes == "exact":
        riff_size, extra, data_size = 4 + 8 + len(fmt) + 8 + data_bytes, b"", data_bytes
    else:
        riff_size, extra, data_size = 0xFFFFFFFF, b"LIST" + struct.pack("<I", 5) + b"INFO\x00\x00", 0xFFFFFFFF
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + extra  # an odd-sized chunk, padded to an even size
        + b"data" + struct.pack("<I", data_size)
    )  # fmt: skip


ANSWERS = {
    "pcm": ("audio/pcm", None),
    "wav": ("audio/wav", "exact"),
    "wav-streamed": ("audio/x-wav", "streamed"),
    "mp3": ("audio/mpeg", None),
}


def speech_server(piper: PiperTTS, answer: str) -> tuple[web.Application, Seen]:
    """Piper's speech for each request, in small writes, as ``answer`` (a key of ANSWERS); seen.sent holds
    the samples sent. The second half of every answer waits until seen.go_on is set: a client that waits
    for the whole answer before it plays any gets it cut short."""

    async def speak(request: web.Request, seen: Seen) -> web.StreamResponse:
        body = await request.json()
        seen.bodies.append(body)
        chunks = await asyncio.to_thread(
            lambda: list(piper.synthesize(body["input"], piper.default_voice, body["speed"]))
        )
        pcm = (np.clip(np.concatenate([c.audio for c in chunks]), -1, 1) * 32767).astype("<i2")
        seen.sent.append(pcm)
        content_type, wav_sizes = ANSWERS[answer]
        payload = (wav_header(wav_sizes, pcm.nbytes) if wav_sizes else b"") + pcm.tobytes()
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        try:
            for start in range(0, len(payload), 4096):
                if start >= len(payload) // 2 and not await asyncio.to_thread(seen.go_on.wait, 5):
                    raise ConnectionAbortedError("the client waited for the whole answer")  # ends the answer short
                await response.write(payload[start : start + 4096])
        except asyncio.CancelledError:  # the client closed the connection
            seen.abandoned += 1
            raise
        await response.write_eof()
        return response

    return model_server("audio/speech", speak, models=("piper-joe",))


@pytest.mark.parametrize("answer", ["pcm", "wav", "wav-streamed"])
def test_speaks_real_speech_sentence_by_sentence(piper: PiperTTS, whisper: FasterWhisperASR, answer: str) -> None:
    sentences = ["The weather is lovely today.", "Shall we go for a walk in the park?"]
    response_format = answer.split("-")[0]
    app, seen = speech_server(piper, answer)
    with serving(app) as base_url:
        # A WAV answer says its own sample rate: the configured one is for raw PCM only.
        rate = PIPER_RATE if answer == "pcm" else 24000
        tts = OpenAITTS(OpenAITTS.Settings(base_url=base_url, response_format=response_format, sample_rate=rate))
        try:
            speech = tts.synthesize(" ".join(sentences), "a-voice-only-the-server-knows", speed=1.1)
            first = next(speech)  # arrives while the server holds back the second half of the answer
            seen.go_on.set()
            chunks = [first, *speech]
        finally:
            tts.close()
    assert [body["input"] for body in seen.bodies] == sentences
    for body in seen.bodies:
        assert body["voice"] == "a-voice-only-the-server-knows" and body["speed"] == 1.1
        assert body["model"] == "piper-joe" and body["response_format"] == response_format
    assert {chunk.sample_rate for chunk in chunks} == {PIPER_RATE}
    heard = []
    for sentence, sent in zip(sentences, seen.sent):
        pieces = [chunk for chunk in chunks if chunk.text == sentence]
        assert [chunk.starts_sentence for chunk in pieces] == [True] + [False] * (len(pieces) - 1)
        assert len(pieces) >= 3 and all(len(chunk.audio) == round(0.2 * PIPER_RATE) for chunk in pieces[:-1])
        audio = np.concatenate([chunk.audio for chunk in pieces])
        assert np.array_equal(audio, sent.astype(np.float32) / 32768)
        heard.append(whisper.transcribe(resample(audio, PIPER_RATE, 16000)).text)
    # Speech, not noise (which Whisper hears as nothing or as words unrelated to the text); Piper samples
    # its voice at random and Whisper base mishears a word or two now and then.
    assert word_error_rate(" ".join(sentences), " ".join(heard)) <= 0.4, heard


def test_closing_the_speech_closes_the_connection(piper: PiperTTS) -> None:
    app, seen = speech_server(piper, "pcm")
    with serving(app) as base_url:
        tts = OpenAITTS(OpenAITTS.Settings(base_url=base_url, sample_rate=PIPER_RATE))
        try:
            speech = tts.synthesize("The capital of France is Paris. It is a big city!", tts.default_voice)
            next(speech)
            speech.close()  # a barge-in, while the server still holds back the rest
            deadline = time.monotonic() + 5
            while seen.abandoned == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            seen.go_on.set()
            tts.close()
    assert seen.abandoned == 1 and len(seen.bodies) == 1


def test_audio_it_cannot_play_is_a_clear_error(piper: PiperTTS) -> None:
    app, seen = speech_server(piper, "mp3")
    seen.go_on.set()
    with serving(app) as base_url:
        tts = OpenAITTS(OpenAITTS.Settings(base_url=base_url))
        try:
            with pytest.raises(RemoteServerError, match=r"answered audio/mpeg, .*tts\.response_format"):
                list(tts.synthesize("Hello.", tts.default_voice))
        finally:
            tts.close()

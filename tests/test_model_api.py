"""Facecast as an OpenAI- and OPEA-compatible service, over real HTTP with the real embedded models: the
official ``openai`` client, OPEA's own acceptance checks (its field names, a 16 kHz question to
/v1/avatarchatbot, a 48 kHz stereo WAV to /v1/animation), and every bad input getting a JSON error."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import openai
import pytest
import pytest_asyncio

from engines import PROJECT_ROOT
from engines.audio import resample, wav_file
from engines.llm.openai import OpenAILLM
from media_server.cli.avatars import avatar_of_face
from media_server.config import ConfigError, Settings, load_settings
from media_server.http.app import create_app
from media_server.runtime import Runtime
from media_server.testing.processes import free_port
from media_server.testing.servers import served
from media_server.testing.speech_corpus import espeak, word_error_rate
from tests.test_render import probe

QUESTION = "What is the capital of France?"
SPOKEN = "The weather is lovely today."


def question_wav(rate: int = 16000, channels: int = 1, text: str = QUESTION) -> bytes:
    """``text`` spoken by espeak-ng, as a 16-bit WAV at ``rate`` with ``channels`` (the same speech in each)."""
    speech = resample(*espeak(text), rate)
    pcm = (np.clip(np.repeat(speech[:, None], channels, axis=1), -1, 1) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm.tobytes())
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def heard(runtime: Runtime, wav: bytes) -> str:
    """What the server's own Whisper hears in a WAV file."""
    with wave.open(io.BytesIO(wav)) as reader:
        rate = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    return runtime.engines.asr.transcribe(resample(pcm.astype(np.float32) / 32768, rate, 16000)).text


async def call(base_url: str, method: str, path: str, **options: object) -> tuple[int, object, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.request(method, base_url + path, **options) as response:
        body = await response.read()
        try:
            payload: object = json.loads(body)
        except ValueError:
            payload = body
        return response.status, payload, dict(response.headers)


# --- OpenAI-compatible, with the official client -------------------------------------------------------


@pytest_asyncio.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as opened:
        yield opened


async def test_models_are_the_personas(client: openai.AsyncOpenAI, runtime: Runtime) -> None:
    listed = [model.id async for model in client.models.list()]
    assert listed == list(runtime.personas)


async def test_chat_completion_streamed_with_the_openai_client(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": QUESTION}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len(chunks) >= 4 and "paris" in text.lower(), text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_chat_completion_whole_and_capped(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(
        model="guide", messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}]
    )
    assert whole.choices[0].message.content.strip() and whole.model == "guide"
    capped = await client.chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=2
    )
    assert capped.choices[0].finish_reason == "length" and capped.choices[0].message.content


async def test_transcription_with_the_openai_client(client: openai.AsyncOpenAI) -> None:
    transcript = await client.audio.transcriptions.create(
        model="whisper-1", file=("question.wav", question_wav(44100, 2), "audio/wav")
    )
    assert word_error_rate(QUESTION, transcript.text) <= 0.2, transcript.text


@pytest.mark.parametrize("response_format", ["wav", "pcm"])
async def test_speech_with_the_openai_client(client: openai.AsyncOpenAI, runtime: Runtime, response_format: str) -> None:
    async with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="joe", input=SPOKEN, response_format=response_format
    ) as response:
        parts = [part async for part in response.iter_bytes()]
    audio = b"".join(parts)
    if response_format == "wav":
        assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
        samples = np.frombuffer(audio[44:], dtype="<i2")
        rate = int.from_bytes(audio[24:28], "little")
    else:
        samples, rate = np.frombuffer(audio, dtype="<i2"), 24000
    wav = wav_file(samples.astype(np.float32) / 32768, rate)
    assert word_error_rate(SPOKEN, heard(runtime, wav)) <= 0.4
    assert len(parts) >= 2  # streamed as it was synthesised, not in one piece


def with_api(runtime: Runtime, **changes: object) -> Runtime:
    settings: Settings = runtime.settings
    return dataclasses.replace(runtime, settings=settings.model_copy(update={"api": settings.api.model_copy(update=changes)}))


async def test_a_streamed_reply_whose_llm_server_is_down_ends_with_an_error_event(runtime: Runtime) -> None:
    down = OpenAILLM(OpenAILLM.Settings(base_url=f"http://127.0.0.1:{free_port()}/v1", retries=0))
    broken = dataclasses.replace(runtime, engines=dataclasses.replace(runtime.engines, llm=down))
    try:
        async with served(create_app(broken)) as base_url:
            body = {"model": "assistant", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
            status, payload, headers = await call(base_url, "POST", "/v1/chat/completions", json=body)
            whole_status, whole, _ = await call(base_url, "POST", "/v1/chat/completions", json={**body, "stream": False})
    finally:
        down.close()
    events = [line.removeprefix(b"data: ") for line in payload.split(b"\n\n") if line.startswith(b"data: ")]
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    failure = json.loads(events[-1])["error"]
    assert failure["code"] == "engine_failed" and "cannot reach the LLM server" in failure["message"]
    assert whole_status == 502 and "llm.base_url" in whole["error"]["message"]


# --- OPEA's acceptance checks ----------------------------------------------------------------------------


async def test_avatarchatbot_answers_a_16khz_question_with_a_playable_mp4(base_url: str, runtime: Runtime) -> None:
    """GenAIExamples' tests/test_compose_on_xeon.sh: the answer is a path containing "mp4"; here the MP4
    is also opened: H.264 and AAC, the two tracks the same length, and the avatar says an answer."""
    body = {"audio": b64(question_wav(16000)), "max_tokens": 64}
    status, path, headers = await call(base_url, "POST", "/v1/avatarchatbot", json=body)
    assert status == 200 and isinstance(path, str) and "mp4" in path, path
    found = probe(Path(path))
    assert found["codecs"] == ("h264", "aac")
    assert found["video_s"] > 0.8 and abs(found["video_s"] - found["audio_s"]) <= 0.1
    assert len(found["frames"]) == round(found["video_s"] * runtime.settings.media.fps)
    answer = runtime.engines.asr.transcribe(resample(found["samples"].astype(np.float32), 48000, 16000)).text
    assert "paris" in answer.lower(), answer
    status, download, download_headers = await call(base_url, "GET", headers["Location"])
    assert status == 200 and download == Path(path).read_bytes() and download_headers["Content-Type"] == "video/mp4"


async def test_animation_of_a_48khz_stereo_wav(base_url: str) -> None:
    """GenAIComps' animation check posts a 48 kHz stereo WAV as {"byte_str": ...}."""
    wav = question_wav(48000, 2, SPOKEN)
    seconds = (len(wav) - 44) / (48000 * 4)
    status, answer, _ = await call(base_url, "POST", "/v1/animation", json={"byte_str": b64(wav)})
    assert status == 200 and set(answer) == {"video_path"}
    found = probe(Path(answer["video_path"]))
    assert found["codecs"] == ("h264", "aac") and abs(found["video_s"] - seconds) <= 0.1
    status, answer, _ = await call(base_url, "POST", "/v1/wav2lip", json={"audio": b64(wav)})
    assert status == 200 and Path(answer["wav2lip_result"]).is_file()


async def test_asr_and_tts_as_opea_services(base_url: str, runtime: Runtime) -> None:
    status, answer, _ = await call(base_url, "POST", "/v1/asr", json={"audio": b64(question_wav(16000))})
    assert status == 200 and word_error_rate(QUESTION, answer["asr_result"]) <= 0.2, answer
    status, answer, _ = await call(base_url, "POST", "/v1/tts", json={"text": SPOKEN, "voice": "default"})
    wav = base64.b64decode(answer["tts_result"])
    assert status == 200 and wav[:4] == b"RIFF" and word_error_rate(SPOKEN, heard(runtime, wav)) <= 0.4


async def test_audioqna_answers_with_a_bare_base64_wav(base_url: str, runtime: Runtime) -> None:
    body = {"audio": b64(question_wav(16000)), "max_tokens": 64}
    status, answer, _ = await call(base_url, "POST", "/v1/audioqna", json=body)
    wav = base64.b64decode(answer)
    assert status == 200 and wav[:4] == b"RIFF" and "paris" in heard(runtime, wav).lower()


async def test_health_checks(base_url: str) -> None:
    status, answer, _ = await call(base_url, "GET", "/v1/health_check")
    assert status == 200 and answer["Service Title"] == "Facecast"
    status, answer, _ = await call(base_url, "GET", "/health")
    assert status == 200


# --- what a caller can get wrong ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/asr", {"audio": "not base64!"}, 400, '"audio" is not valid base64'),
        ("/v1/asr", {"audio": b64(b"RIFF and then nothing that is audio")}, 400, "could not be read as audio"),
        ("/v1/asr", {}, 400, '"audio" must be a non-empty base64 string'),
        ("/v1/tts", {"text": "  "}, 400, '"text" must be a non-empty string'),
        ("/v1/tts", {"text": "Hi", "voice": "nobody"}, 404, "unknown voice 'nobody'; available: default, joe"),
        ("/v1/animation", {"byte_str": b64(b"\x00" * 64)}, 400, "could not be read as audio"),
        ("/v1/animation", {"byte_str": "UklGRg==", "avatar": "nobody"}, 404, "unknown avatar 'nobody'; available: default"),
        ("/v1/audio/speech", {"input": "Hi", "response_format": "mp3"}, 400, '"response_format" must be one of wav, pcm'),
        ("/v1/audio/speech", {"input": "Hi", "speed": 9}, 400, '"speed" must be a number'),
        ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}, 404,
         "unknown model (a persona) 'gpt-4'; available: assistant, guide"),
        ("/v1/chat/completions", {"model": "assistant", "messages": []}, 400, '"messages" must be a non-empty list'),
        ("/v1/chat/completions", {"model": "assistant", "messages": [{"role": "assistant", "content": "Hi"}]}, 400,
         "the last message must be the user's"),
        ("/v1/chat/completions", {"model": "assistant", "messages": [{"role": "tool", "content": "x"}]}, 400,
         "is not one of system, developer, user, assistant"),
        ("/v1/avatarchatbot", {"audio": b64(wav_file(np.zeros(16000, np.float32), 16000))}, 400, "no speech was heard"),
        ("/v1/avatarchatbot", {"audio": "UklGRg==", "max_tokens": 0}, 400, '"max_tokens" must be a whole number'),
    ],
)  # fmt: skip
async def test_bad_requests_get_a_json_error_saying_what_to_fix(
    base_url: str, path: str, body: dict[str, object], status: int, fragment: str
) -> None:
    got, answer, _ = await call(base_url, "POST", path, json=body)
    assert got == status and fragment in answer["error"]["message"], answer


async def test_transcription_needs_a_file(base_url: str) -> None:
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    status, answer, _ = await call(base_url, "POST", "/v1/audio/transcriptions", data=form)
    assert status == 400 and '"file" field' in answer["error"]["message"]


async def test_outputs_are_served_by_their_own_names_only(base_url: str) -> None:
    for name in ("..%2F..%2Fetc%2Fpasswd", "result.mp4", "facecast-20250101-000000-" + "0" * 32 + ".mp4"):
        status, answer, _ = await call(base_url, "GET", f"/outputs/{name}")
        assert status == 404 and answer["error"]["code"] == "not_found"


async def test_limits_renders_queue_and_retention(runtime: Runtime, tmp_path: Path) -> None:
    limited = with_api(
        runtime, max_body_bytes=200_000, max_audio_s=3.0, max_text_chars=40, render_queue=0, outputs_keep=2,
        outputs_dir=tmp_path,
    )  # fmt: skip
    async with served(create_app(limited)) as base_url:
        status, answer, _ = await call(base_url, "POST", "/v1/asr", json={"audio": "A" * 300_000})
        assert status == 413 and "api.max_body_bytes" in answer["error"]["message"]
        long_audio = b64(wav_file(np.zeros(4 * 16000, np.float32), 16000))
        status, answer, _ = await call(base_url, "POST", "/v1/asr", json={"audio": long_audio})
        assert status == 400 and "longer than 3 s" in answer["error"]["message"]
        status, answer, _ = await call(base_url, "POST", "/v1/tts", json={"text": "word " * 10})
        assert status == 400 and "api.max_text_chars" in answer["error"]["message"]
        short = {"byte_str": b64(question_wav(16000, 1, "Hello there."))}
        results = await asyncio.gather(*(call(base_url, "POST", "/v1/animation", json=short) for _ in range(2)))
        refused = [r for r in results if r[0] == 503]
        assert len(refused) == 1 and int(refused[0][2]["Retry-After"]) > 0, [r[:2] for r in results]
        for _ in range(2):
            status, _, _ = await call(base_url, "POST", "/v1/animation", json=short)
            assert status == 200
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == 2 and all(name.startswith("facecast-") and name.endswith(".mp4") for name in kept)


async def test_the_model_apis_answer_this_machine_only_until_a_token_is_set(base_url: str, runtime: Runtime) -> None:
    status, answer, _ = await call(base_url, "GET", "/v1/models", headers={"X-Forwarded-For": "203.0.113.9"})
    assert status == 403 and "server.api_token" in answer["error"]["message"]
    token = "a-long-enough-test-token"
    server = runtime.settings.server.model_copy(update={"api_token": token})
    protected = dataclasses.replace(runtime, settings=runtime.settings.model_copy(update={"server": server}))
    async with served(create_app(protected)) as protected_url:
        status, _, headers = await call(protected_url, "POST", "/v1/tts", json={"text": "Hi"})
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = await call(protected_url, "GET", "/v1/models", headers={"Authorization": f"Bearer {token}"})
        assert status == 200


# --- OPEA's environment names -------------------------------------------------------------------------


def test_opeas_environment_names_configure_the_server_and_lose_to_facecasts_own() -> None:
    opea = {
        "FACE": "default",
        "FPS": "10",
        "OUTFILE": "/outputs/result.mp4",
        "INFERENCE_MODE": "wav2lip+gfpgan",
        "CHECKPOINT_PATH": "/checkpoints/wav2lip_gan.pth",
    }
    settings = load_settings(None, {}, environ=opea)
    assert (settings.server.default_avatar, settings.media.fps, settings.api.outputs_dir) == ("default", 10, Path("/outputs"))
    assert settings.lipsync.engine == "wav2lip" and settings.lipsync.options == {"checkpoint": "/checkpoints/wav2lip_gan.pth"}
    assert settings.enhancer is not None and settings.enhancer.engine == "gfpgan"
    assert load_settings(None, {"media.fps": "25"}, environ={**opea, "FACECAST__LIPSYNC__ENGINE": "warp"}).media.fps == 25
    assert load_settings(None, {}, environ={"INFERENCE_MODE": "wav2lip_only"}).enhancer is None
    with pytest.raises(ConfigError, match="INFERENCE_MODE='sadtalker' .*wav2lip_only, wav2lip\\+gfpgan"):
        load_settings(None, {}, environ={"INFERENCE_MODE": "sadtalker"})


def test_a_face_photo_becomes_the_default_avatar(tmp_path: Path) -> None:
    photo = tmp_path / "avatar5.jpg"
    photo.write_bytes((PROJECT_ROOT / "avatars" / "default" / "portrait.jpg").read_bytes())
    settings = load_settings(None, {"server.avatars_dir": str(tmp_path / "avatars")}, environ={"FACE": str(photo)})
    adopted = avatar_of_face(settings, io.StringIO())
    assert adopted.server.default_avatar == "avatar5" and (tmp_path / "avatars" / "avatar5" / "avatar.toml").is_file()
    assert avatar_of_face(settings, io.StringIO()).server.default_avatar == "avatar5"  # added once
    photo.write_bytes(b"not a picture")
    with pytest.raises(ConfigError, match="cannot be an avatar"):
        avatar_of_face(settings, io.StringIO())

"""The OpenAI-compatible API (``/v1/...``): any OpenAI client can use Facecast's personas, ears and voice.

- ``GET /v1/models``: the personas, each a "model".
- ``POST /v1/chat/completions``: a persona's reply (``model`` names the persona), whole or streamed as
  server-sent events in OpenAI's chunk format; a client that goes away stops the model.
- ``POST /v1/audio/transcriptions``: multipart ``file`` (any container PyAV decodes); any ``model``.
- ``POST /v1/audio/speech``: ``input`` spoken in ``voice`` as ``wav`` or ``pcm`` (16-bit mono at 24 kHz,
  as OpenAI's), streamed as it is synthesised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.web_request import FileField

from engines.audio import pcm16
from engines.base import SpeechChunk
from media_server.http.errors import ApiError, bad_request, json_body
from media_server.http.state import RUNTIME, SERVICE
from media_server.service.audio import StreamResampler
from media_server.service.chat import Reply, conversation, with_instructions
from media_server.service.errors import BadInput, ServiceError
from media_server.service.speech import NO_AUDIO, checked_speed, checked_text

log = logging.getLogger(__name__)
PCM_RATE = 24000  # OpenAI's "pcm": what its clients assume
SPEECH_FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")
STREAMED_WAV_SIZE = 0xFFFFFFFF  # a WAV header written before its length is known


def optional_count(body: dict[str, object], *names: str) -> int | None:
    """The first of ``names`` the body has, a whole number of at least 1 (None when it has none)."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(f'"{name}" must be a whole number of at least 1')
        return value
    return None


async def models(request: web.Request) -> web.Response:
    personas = request.app[RUNTIME].personas
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "facecast"} for name in personas]
    return web.json_response({"object": "list", "data": data})


def _chunk(completion_id: str, model: str, delta: dict[str, str], finish_reason: str | None) -> bytes:
    chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    body = await json_body(request)
    persona = service.persona(body.get("model"))
    instructions, history = conversation(body.get("messages"), service.settings.api.max_text_chars)
    max_tokens = optional_count(body, "max_completion_tokens", "max_tokens")
    reply = service.reply(with_instructions(persona, instructions), history, max_tokens)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.get("stream") is True:
        return await _streamed(request, reply, completion_id, persona.name)
    text = await reply.text()
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": persona.name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reply.finish_reason}
            ],
        }
    )


async def _streamed(request: web.Request, reply: Reply, completion_id: str, model: str) -> web.StreamResponse:
    """The reply as server-sent events; a failure after the first event is an ``error`` event, as OpenAI's."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(_chunk(completion_id, model, {"role": "assistant", "content": ""}, None))
    try:
        async with contextlib.aclosing(aiter(reply)) as deltas:
            async for delta in deltas:
                await response.write(_chunk(completion_id, model, {"content": delta}, None))
    except ConnectionResetError:  # the client went away: leaving the loop has stopped the model
        return response
    except ServiceError as error:
        failure = {"error": {"code": error.code, "message": error.message}}
        await response.write(f"data: {json.dumps(failure)}\n\n".encode())
    else:
        await response.write(_chunk(completion_id, model, {}, reply.finish_reason))
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def transcriptions(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if request.content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError(415, "unsupported_media_type", 'send the audio as multipart/form-data with a "file" field')
    try:
        form = await request.post()
    except ValueError as error:  # aiohttp's own words for a form it cannot parse
        raise bad_request(f"the form could not be read: {error}") from None
    upload = form.get("file")
    if not isinstance(upload, FileField):
        raise bad_request('the form needs a "file" field holding the audio (any model name is accepted)')
    response_format = form.get("response_format", "json")
    if response_format not in TRANSCRIPTION_FORMATS:
        raise bad_request(f'"response_format" must be one of {", ".join(TRANSCRIPTION_FORMATS)}')
    text = await service.transcribe(upload.file.read(), '"file"')
    if response_format == "text":
        return web.Response(text=text)
    if response_format == "verbose_json":
        language = service.settings.asr.options.get("language")
        return web.json_response({"task": "transcribe", "text": text, "language": language})
    return web.json_response({"text": text})


def streamed_wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say "unknown": the audio runs to the end of the body."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF" + struct.pack("<I", STREAMED_WAV_SIZE) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", STREAMED_WAV_SIZE)
    )  # fmt: skip


async def _pcm(first: SpeechChunk, rest: AsyncIterator[SpeechChunk], rate: int | None) -> AsyncIterator[bytes]:
    """16-bit PCM of ``first`` and the pieces after it, at their own rate or resampled to ``rate``."""
    resampler = StreamResampler(first.sample_rate, rate) if rate is not None else None
    piece: SpeechChunk | None = first
    while piece is not None:
        yield pcm16(piece.audio if resampler is None else resampler.push(piece.audio))
        piece = await anext(rest, None)
    if resampler is not None:
        yield pcm16(resampler.flush())


async def speech(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    body = await json_body(request)
    text = checked_text(body.get("input"), "input", service.settings.api.max_text_chars)
    voice = service.voice(body.get("voice"))
    speed = checked_speed(body.get("speed"))
    response_format = body.get("response_format", "wav")
    if response_format not in SPEECH_FORMATS:
        formats = ", ".join(SPEECH_FORMATS)
        raise BadInput(f'"response_format" must be one of {formats} (mp3, opus, aac and flac are not made here)')
    pieces = aiter(service.speech(text, voice, speed))
    async with contextlib.aclosing(pieces):
        first = await anext(pieces, None)  # before the status goes out: a failure here is still a JSON error
        if first is None:
            raise BadInput(NO_AUDIO)
        response = web.StreamResponse(headers={"Content-Type": SPEECH_FORMATS[response_format]})
        await response.prepare(request)
        if response_format == "wav":
            await response.write(streamed_wav_header(first.sample_rate))
        try:
            async for data in _pcm(first, pieces, PCM_RATE if response_format == "pcm" else None):
                await response.write(data)
        except ConnectionResetError:  # the client went away: leaving the loop has stopped the voice
            return response
        except ServiceError as error:
            log.warning("speech cut short: %s", error)
            if request.transport is not None:  # the status is out: a body cut short is the only signal left
                request.transport.close()
            return response
    await response.write_eof()
    return response

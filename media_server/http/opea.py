"""The OPEA-compatible API, field for field with GenAIComps' services and GenAIExamples' megaservices, so
an OPEA deployment can point its ASR, TTS and animation services (or the whole AvatarChatbot) here.

- ``POST /v1/asr`` ``{"audio": b64}`` → ``{"asr_result": text}`` (the whisper service)
- ``POST /v1/tts`` ``{"text", "voice"}`` → ``{"tts_result": b64 WAV}`` (the speecht5 service)
- ``POST /v1/animation`` ``{"byte_str": b64 WAV}`` → ``{"video_path": path}`` (the animation service)
- ``POST /v1/wav2lip`` ``{"audio": b64}`` → ``{"wav2lip_result": path}`` (the wav2lip service)
- ``POST /v1/avatarchatbot`` ``{"audio": b64, "max_tokens", "voice", ...}`` → the MP4's path, a bare JSON string
- ``POST /v1/audioqna`` ``{"audio": b64, "max_tokens", "voice", ...}`` → the answer's WAV, a bare base64 string
- ``GET /v1/health_check``, ``GET /health``
- ``GET /outputs/{name}``: a rendered MP4

Audio may be in any container PyAV decodes. Every MP4 gets a name of its own in ``api.outputs_dir`` (OPEA's
services overwrite one result.mp4); its path is the answer, and ``Location`` says where to download it.
``persona`` and ``avatar`` are Facecast's own optional fields.
"""

from __future__ import annotations

import base64
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from aiohttp import web

from media_server.http.errors import json_body
from media_server.http.openai_api import optional_count
from media_server.http.state import SERVICE
from media_server.service.audio import decoded_base64
from media_server.service.speech import checked_text

SERVICE_TITLE = "Facecast"
SERVICE_DESCRIPTION = "Talking-avatar server: OPEA-compatible ASR, TTS, animation, AudioQnA and AvatarChatbot"


def _video_answer(body: object, path: Path) -> web.Response:
    return web.json_response(body, headers={"Location": f"/outputs/{path.name}"})


async def asr(request: web.Request) -> web.Response:
    audio = decoded_base64((await json_body(request)).get("audio"), "audio")
    return web.json_response({"asr_result": await request.app[SERVICE].transcribe(audio, '"audio"')})


async def tts(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await json_body(request)
    text = checked_text(body.get("text"), "text", service.settings.api.max_text_chars)
    wav = await service.speech_wav(text, service.voice(body.get("voice")))
    return web.json_response({"tts_result": base64.b64encode(wav).decode()})


async def animation(request: web.Request) -> web.Response:
    return await _animated(request, audio_field="byte_str", path_field="video_path")


async def wav2lip(request: web.Request) -> web.Response:
    return await _animated(request, audio_field="audio", path_field="wav2lip_result")


async def _animated(request: web.Request, audio_field: str, path_field: str) -> web.Response:
    """The avatar speaking the request's audio, for OPEA's two names of it (each with its own fields)."""
    service = request.app[SERVICE]
    body = await json_body(request)
    audio = decoded_base64(body.get(audio_field), audio_field)
    path = await service.animate(audio, service.avatar(body.get("avatar")))
    return _video_answer({path_field: str(path)}, path)


async def avatarchatbot(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await json_body(request)
    audio = decoded_base64(body.get("audio"), "audio")
    persona = service.persona(body.get("persona"))
    voice, avatar = service.voice(body.get("voice"), persona), service.avatar(body.get("avatar"))
    path = await service.answer_video(audio, persona, voice, avatar, optional_count(body, "max_tokens"))
    return _video_answer(str(path), path)


async def audioqna(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await json_body(request)
    audio = decoded_base64(body.get("audio"), "audio")
    persona = service.persona(body.get("persona"))
    voice = service.voice(body.get("voice"), persona)
    wav = await service.answer_speech(audio, persona, voice, optional_count(body, "max_tokens"))
    return web.json_response(base64.b64encode(wav).decode())


def _version() -> str:
    try:
        return version("facecast")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


async def health_check(request: web.Request) -> web.Response:
    return web.json_response(
        {"Service Title": SERVICE_TITLE, "Version": _version(), "Service Description": SERVICE_DESCRIPTION}
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def output(request: web.Request) -> web.FileResponse:
    path = request.app[SERVICE].outputs.existing(request.match_info["name"])
    return web.FileResponse(path, headers={"Content-Type": "video/mp4"})

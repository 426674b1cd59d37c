"""``ModelService``: what the OpenAI- and OPEA-compatible APIs ask of the engines, one method per kind of
work, each blocking step in a worker thread and each engine call within its deadline (``[deadlines]``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from engines.audio import wav_file
from engines.avatar import AvatarError
from engines.base import ChatMessage, Persona, SpeechChunk
from media_server.conversation.deadlines import StageTimeout, within
from media_server.runtime import Runtime
from media_server.service.audio import StreamResampler, read_audio, speech_heard
from media_server.service.chat import Reply
from media_server.service.errors import BadInput, EngineFailed, EngineTimedOut, UnusableAvatar, not_found
from media_server.service.outputs import Outputs
from media_server.service.queue import RenderQueue
from media_server.service.speech import chosen_voice, joined, speech, spoken_reply
from media_server.service.video import SpeechVideo

PUSH_SECONDS = 0.5  # of speech, pushed to the lip-sync stream at a time
LOOK_AHEAD_S = 0.25  # speech a lip-sync stream may hold back before it renders the frames it belongs to


class RenderJobs(Protocol):
    """Renders run as durable jobs by other processes (a cluster's workers: cluster/node.py)."""

    async def render_mp4(self, audio: bytes, avatar: str, timeout_s: float) -> tuple[str, bytes] | None:
        """The job's id (32 hex digits) and the MP4 of ``avatar`` speaking ``audio``; None when no job can be
        taken now (render it here); TimeoutError after ``timeout_s``; RuntimeError with the job's error."""
        ...


class ModelService:
    def __init__(self, runtime: Runtime, jobs: RenderJobs | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        api = runtime.settings.api
        self.outputs = Outputs(api.outputs_dir, api.outputs_keep)
        self.renders = RenderQueue(api.max_concurrent_renders, api.render_queue)
        self.jobs = jobs

    # --- choices -----------------------------------------------------------------------------

    def persona(self, name: object = None) -> Persona:
        if name is None:
            return self.runtime.personas[self.settings.server.default_persona].persona
        if not isinstance(name, str) or name not in self.runtime.personas:
            raise not_found("model (a persona)", name, list(self.runtime.personas))
        return self.runtime.personas[name].persona

    def voice(self, requested: object, persona: Persona | None = None) -> str:
        persona_name = (persona or self.persona()).name
        return chosen_voice(self.runtime.engines.tts, requested, self.runtime.voice_for(persona_name))

    def avatar(self, requested: object) -> str:
        names = self.runtime.avatars.names()
        if requested is None:
            return self.settings.server.default_avatar
        if not isinstance(requested, str) or requested not in names:
            raise not_found("avatar", requested, names)
        return requested

    # --- the stages ----------------------------------------------------------------------------

    async def transcribe(self, audio: bytes, what: str = "the audio") -> str:
        """What is said in ``audio`` (any container PyAV decodes): "" when the VAD hears no speech in it."""
        asr, vad, turn_taking = self.runtime.engines.asr, self.runtime.engines.vad, self.settings.turn_taking
        samples = await asyncio.to_thread(read_audio, audio, asr.sample_rate, self.settings.api.max_audio_s, what)
        threshold, min_speech_ms = turn_taking.vad_threshold, turn_taking.min_speech_ms
        if not await asyncio.to_thread(speech_heard, vad, samples, asr.sample_rate, threshold, min_speech_ms):
            return ""
        deadline = self.settings.deadlines.asr_s
        try:
            transcript = await within(asyncio.to_thread(asr.transcribe, samples), deadline, "asr", "asr_s")
        except StageTimeout as error:
            raise EngineTimedOut(str(error)) from None
        except Exception as error:  # the engine's own failure, in its words
            raise EngineFailed(f"the asr engine failed: {error}") from None
        return transcript.text.strip()

    def reply(self, persona: Persona, history: list[ChatMessage], max_tokens: int | None = None) -> Reply:
        return Reply(self.runtime.engines.llm, persona, history, self.settings.deadlines, max_tokens)

    def speech(self, text: str, voice: str, speed: float = 1.0) -> AsyncIterator[SpeechChunk]:
        return speech(self.runtime.engines.tts, text, voice, self.settings.deadlines, speed)

    async def speech_wav(self, text: str, voice: str, speed: float = 1.0) -> bytes:
        """``text`` spoken, as a 16-bit mono WAV file at the voice's own rate."""
        return wav_file(*joined([piece async for piece in self.speech(text, voice, speed)]))

    async def question(self, audio: bytes) -> str:
        """The question spoken in ``audio``; BadInput when nothing is said in it."""
        text = await self.transcribe(audio, '"audio"')
        if not text:
            raise BadInput('no speech was heard in "audio": send a recording of a spoken question')
        return text

    def _spoken_answer(
        self, question: str, persona: Persona, voice: str, max_tokens: int | None
    ) -> AsyncIterator[SpeechChunk]:
        reply = self.reply(persona, [ChatMessage("user", question)], max_tokens)
        tts = self.runtime.engines.tts
        return spoken_reply(aiter(reply), tts, voice, self.settings.reply, self.settings.deadlines)

    # --- whole answers -------------------------------------------------------------------------

    async def answer_speech(self, audio: bytes, persona: Persona, voice: str, max_tokens: int | None) -> bytes:
        """ASR → LLM → TTS: the spoken answer to a spoken question, as a WAV file (the TTS speaks each
        sentence as soon as the LLM has written it)."""
        question = await self.question(audio)
        pieces = [piece async for piece in self._spoken_answer(question, persona, voice, max_tokens)]
        return wav_file(*joined(pieces))

    async def answer_video(
        self, audio: bytes, persona: Persona, voice: str, avatar: str, max_tokens: int | None
    ) -> Path:
        """ASR → LLM → TTS → lip-sync: an MP4 of the avatar speaking its answer, every stage streaming into
        the next (sentences are spoken while the LLM writes on, frames encoded as they are rendered). In a
        cluster the spoken answer is rendered as a job by a worker."""
        if self.jobs is not None:
            spoken = await self.answer_speech(audio, persona, voice, max_tokens)
            if (path := await self._render_job(spoken, avatar)) is not None:
                return path
        async with self.renders.turn():
            question = await self.question(audio)
            async with self._video(avatar) as video:
                resampler: StreamResampler | None = None
                async for piece in self._spoken_answer(question, persona, voice, max_tokens):
                    resampler = resampler or StreamResampler(piece.sample_rate, video.sample_rate)
                    await self._push(video, resampler.push(piece.audio))
                if resampler is None:
                    raise EngineFailed("the answer had nothing to say")
                await self._push(video, resampler.flush())
        self.outputs.prune()
        return video.path

    async def animate(self, audio: bytes, avatar: str) -> Path:
        """An MP4 of the avatar speaking ``audio`` (any container PyAV decodes); in a cluster, a job for its
        workers (a worker killed mid-render, the job goes to another)."""
        rate, limit = self.settings.media.sample_rate, self.settings.api.max_audio_s
        if self.jobs is not None:
            await asyncio.to_thread(read_audio, audio, rate, limit, "the audio")  # refused here if unusable
            if (path := await self._render_job(audio, avatar)) is not None:
                return path
        async with self.renders.turn():
            samples = await asyncio.to_thread(read_audio, audio, rate, limit, "the audio")
            async with self._video(avatar) as video:
                await self._push(video, samples)
        self.outputs.prune()
        return video.path

    async def _render_job(self, audio: bytes, avatar: str) -> Path | None:
        """The MP4 a cluster's worker rendered, in the outputs; None when the cluster cannot take it now."""
        assert self.jobs is not None
        timeout_s = self.settings.api.job_timeout_s
        try:
            rendered = await self.jobs.render_mp4(audio, avatar, timeout_s)
        except TimeoutError:
            raise EngineTimedOut(f"no worker finished the render within {timeout_s:g} s (api.job_timeout_s)") from None
        except RuntimeError as error:
            raise EngineFailed(str(error)) from None
        if rendered is None:
            return None
        job_id, mp4 = rendered
        path = self.outputs.new_path(job_id)  # its name says which job made it (GET /api/jobs/{id})
        await asyncio.to_thread(self.outputs.write, path, mp4)
        self.outputs.prune()
        return path

    @contextlib.asynccontextmanager
    async def _video(self, avatar_name: str) -> AsyncIterator[SpeechVideo]:
        """An MP4 of the avatar in the outputs, finished when the block ends; if it fails, nothing is left."""
        runtime, media = self.runtime, self.settings.media
        try:
            avatar = await asyncio.to_thread(runtime.avatars.get, avatar_name)
            await asyncio.to_thread(runtime.engines.lipsync.prepare, avatar)
        except AvatarError as error:
            raise UnusableAvatar(f"avatar {avatar_name!r} cannot be used: {error}") from None
        path = self.outputs.new_path()
        video = await asyncio.to_thread(SpeechVideo, runtime.engines.lipsync, avatar, path, media.fps, media.sample_rate)
        try:
            yield video
            await self._finish(video)
        except BaseException:
            await asyncio.to_thread(video.abandon)
            raise

    async def _push(self, video: SpeechVideo, samples: np.ndarray) -> None:
        """Render ``samples`` into ``video`` in pieces, each in a worker thread within ``deadlines.lipsync_s``
        for every frame it can render (a slow engine, or GFPGAN on a CPU, is slow, not stuck)."""
        piece = int(PUSH_SECONDS * video.sample_rate)
        for offset in range(0, len(samples), piece):
            await self._lipsync(video.push, samples[offset : offset + piece])

    async def _finish(self, video: SpeechVideo) -> None:
        await self._lipsync(video.finish)

    async def _lipsync(self, step: Callable[..., int], *audio: np.ndarray) -> int:
        frames = math.ceil((PUSH_SECONDS + LOOK_AHEAD_S) * self.settings.media.fps)
        deadline = self.settings.deadlines.lipsync_s * frames
        try:
            return await within(asyncio.to_thread(step, *audio), deadline, "lipsync", "lipsync_s")
        except StageTimeout as error:
            raise EngineTimedOut(f"{error}, for each frame") from None

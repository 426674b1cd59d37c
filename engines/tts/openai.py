"""Speech from any OpenAI-compatible ``/audio/speech`` server (OpenAI, Kokoro-FastAPI, speaches, ...).

The text is split into sentences, each sent as its own request in order, and each answer is passed
on in pieces as its body arrives, so the first words play while the rest is still being synthesised.
The answer's ``Content-Type`` says what it is: a WAV file (its header is read, including that of a
streamed WAV whose sizes are 0 or 0xFFFFFFFF) or raw 16-bit little-endian PCM at ``sample_rate``.
Voice names are passed through as they are: each server has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Literal, Self

import aiohttp
import numpy as np
from pydantic import Field, model_validator

from engines.base import SpeechChunk, TTSEngine
from engines.openai_compatible import OpenAIClient, RemoteSettings

WAV_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})
# Not audio/L16: that is big-endian (RFC 2586), and these servers' "pcm" is little-endian.
PCM_TYPES = frozenset({"audio/pcm", "audio/x-pcm", "audio/raw", "application/octet-stream"})
STREAMED_WAV_SIZES = (0, 0xFFFFFFFF)  # written before the length was known
WAVE_FORMAT_PCM, WAVE_FORMAT_EXTENSIBLE = 1, 0xFFFE
SAMPLE_BYTES = 2
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
WARM_UP_TEXT = "Hello."


@dataclass(frozen=True)
class PCMFormat:
    sample_rate: int
    channels: int


class WavFormatError(ValueError):
    """A WAV header that is not 16-bit PCM, or not a WAV header at all."""


class OpenAITTS(TTSEngine):
    class Settings(RemoteSettings):
        voices: list[str] = Field(default_factory=lambda: ["alloy"])  # offered on the page; any name is passed on
        default_voice: str = "alloy"
        response_format: Literal["pcm", "wav"] = "pcm"
        sample_rate: int = Field(24000, ge=8000)  # of raw PCM answers (OpenAI's is 24000)
        chunk_s: float = Field(0.2, gt=0)  # audio passed on at a time, as the answer arrives

        @model_validator(mode="after")
        def _default_voice_offered(self) -> Self:
            if self.default_voice not in self.voices:
                raise ValueError(f"default_voice {self.default_voice!r} is not in voices {self.voices}")
            return self

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client = OpenAIClient(settings, "tts", "TTS server")

    @property
    def voices(self) -> list[str]:
        return list(self._settings.voices)

    @property
    def default_voice(self) -> str:
        return self._settings.default_voice

    def synthesize(self, text: str, voice: str, speed: float = 1.0) -> Iterator[SpeechChunk]:
        for sentence in sentences(text):
            starts_sentence = True
            pieces = self._client.stream(
                lambda sentence=sentence: self._speech(sentence, voice, speed),
                lambda: False,
                self._client.answer_deadline(),
            )
            with contextlib.closing(pieces):
                for audio, rate in pieces:
                    yield SpeechChunk(audio, rate, sentence, starts_sentence=starts_sentence)
                    starts_sentence = False

    async def _speech(self, sentence: str, voice: str, speed: float) -> AsyncIterator[tuple[np.ndarray, int]]:
        body = {
            "model": await self._client.model(),
            "input": sentence,
            "voice": voice,
            "response_format": self._settings.response_format,
            "speed": speed,
        }
        async with self._client.request("POST", "audio/speech", json=body) as response:
            audio_format, length = await self._audio_format(response)
            async for audio in pcm_pieces(response.content, audio_format, length, self._settings.chunk_s):
                yield audio, audio_format.sample_rate

    async def _audio_format(self, response: aiohttp.ClientResponse) -> tuple[PCMFormat, int | None]:
        """The answer's sample format and how many bytes of it are audio (None: all the rest)."""
        content_type = response.content_type.lower()
        if content_type in PCM_TYPES:
            return PCMFormat(self._settings.sample_rate, 1), None
        if content_type not in WAV_TYPES:
            raise self._client.error(
                f"{self._client.where} answered {content_type}, which Facecast cannot play: it reads raw PCM or "
                "WAV (tts.response_format = 'pcm' or 'wav', if the server offers them)"
            )
        try:
            return await wav_header(response.content)
        except (WavFormatError, asyncio.IncompleteReadError) as error:
            raise self._client.error(f"{self._client.where} sent a WAV file Facecast cannot read: {error}") from None

    def warm_up(self) -> None:
        """One short sentence: a server may load its voice on first use."""
        self._client.warm_up(lambda: list(self.synthesize(WARM_UP_TEXT, self.default_voice)))

    def describe(self) -> dict[str, object]:
        s = self._settings
        return {
            **self._client.describe(),
            "voices": s.voices,
            "default_voice": s.default_voice,
            "response_format": s.response_format
            + (f" (16-bit mono at {s.sample_rate} Hz, tts.sample_rate)" if s.response_format == "pcm" else ""),
            "why": "tts.engine = 'openai': speech comes from this server, one request per sentence",
        }

    def close(self) -> None:
        self._client.close()


def sentences(text: str) -> list[str]:
    return [sentence for sentence in SENTENCE_END.split(text.strip()) if sentence]


async def wav_header(content: aiohttp.StreamReader) -> tuple[PCMFormat, int | None]:
    """Read a WAV file's chunks up to its audio: (format, audio bytes, or None when they run to the end)."""
    riff = await content.readexactly(12)
    if riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
        raise WavFormatError(f"it does not start as a WAV file does (RIFF....WAVE): {riff!r}")
    audio_format: PCMFormat | None = None
    while True:
        chunk_id, size = struct.unpack("<4sI", await content.readexactly(8))
        if chunk_id == b"data":
            if audio_format is None:
                raise WavFormatError("its audio comes before its format (no fmt chunk)")
            return audio_format, None if size in STREAMED_WAV_SIZES else size
        chunk = await content.readexactly(size + size % 2)  # chunks are padded to an even size
        if chunk_id == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", chunk[:16])
            if tag not in (WAVE_FORMAT_PCM, WAVE_FORMAT_EXTENSIBLE) or bits != 8 * SAMPLE_BYTES or not channels:
                raise WavFormatError(f"format {tag} with {bits}-bit samples; only 16-bit PCM is read")
            audio_format = PCMFormat(rate, channels)


async def pcm_pieces(
    content: aiohttp.StreamReader, audio_format: PCMFormat, length: int | None, piece_seconds: float
) -> AsyncIterator[np.ndarray]:
    """16-bit PCM from ``content`` as float32 mono pieces of ``piece_seconds`` (the last may be shorter), as it
    arrives; ``length``: how many bytes of it are audio (None: all)."""
    frame_bytes = SAMPLE_BYTES * audio_format.channels
    piece_bytes = max(1, round(audio_format.sample_rate * piece_seconds)) * frame_bytes
    pending = bytearray()
    remaining = length
    async for block in content.iter_any():
        if remaining is not None:
            block = block[:remaining]
            remaining -= len(block)
        pending += block
        while len(pending) >= piece_bytes:
            yield mono_float(bytes(pending[:piece_bytes]), audio_format.channels)
            del pending[:piece_bytes]
        if remaining == 0:
            break
    whole = len(pending) - len(pending) % frame_bytes
    if whole:
        yield mono_float(bytes(pending[:whole]), audio_format.channels)


def mono_float(pcm: bytes, channels: int) -> np.ndarray:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    return samples.reshape(-1, channels).mean(axis=1, dtype=np.float32) if channels > 1 else samples

"""Speech recognition by any OpenAI-compatible ``/audio/transcriptions`` server (OpenAI, speaches, ...).

Each finished utterance is sent as a 16-bit WAV file. Interim transcripts of speech still going on
(``partial=True``) would cost a request every partial interval, so they come from the local
faster-whisper engine when ``local_partials`` is on, and are skipped otherwise.
"""

from __future__ import annotations

import aiohttp
import numpy as np

from engines.asr.faster_whisper import FasterWhisperASR
from engines.audio import wav_file
from engines.base import DETECT_LANGUAGE, ASREngine, Transcript, mono_samples, primary_language
from engines.openai_compatible import OpenAIClient, RemoteSettings

MIN_AUDIO_SECONDS = 0.1  # OpenAI refuses shorter audio
WARM_UP_SECONDS = 0.5


class OpenAIASR(ASREngine):
    class Settings(RemoteSettings):
        language: str | None = "en"  # ISO 639-1, sent with every request; None: the server detects it
        local_partials: bool = False  # interim transcripts from the local faster-whisper engine
        local: FasterWhisperASR.Settings = FasterWhisperASR.Settings()  # that engine (its language: ``language``)

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client = OpenAIClient(settings, "asr", "ASR server")
        self._local: FasterWhisperASR | None = None
        if settings.local_partials:
            local = (
                settings.local
                if settings.language is None
                else settings.local.model_copy(update={"language": settings.language})
            )
            self._local = FasterWhisperASR(local)

    def transcribe(self, audio: np.ndarray, *, partial: bool = False, language: str | None = None) -> Transcript:
        samples = mono_samples(audio)
        seconds = len(samples) / self.sample_rate
        if partial and self._local is not None:
            return self._local.transcribe(samples, partial=True, language=language)
        asked = self._iso_language(language)
        if partial or seconds < MIN_AUDIO_SECONDS:
            return Transcript("", asked or "", seconds)
        wav = wav_file(samples, self.sample_rate)
        text = self._client.call(lambda: self._transcription(wav, asked), self._client.answer_deadline())
        # A detected language is not in the plain JSON answer every server gives: "" says it is unknown.
        return Transcript(text, asked or "", seconds)

    def _iso_language(self, language: str | None) -> str | None:
        """The ISO 639-1 code sent with the request; None: the server detects the language."""
        if language is None:
            return self._settings.language
        return None if language == DETECT_LANGUAGE else primary_language(language)

    async def _transcription(self, wav: bytes, language: str | None) -> str:
        form = aiohttp.FormData()
        form.add_field("file", wav, filename="utterance.wav", content_type="audio/wav")
        form.add_field("model", await self._client.model())
        if language:
            form.add_field("language", language)
        form.add_field("response_format", "json")
        async with self._client.request("POST", "audio/transcriptions", data=form) as response:
            answer = await self._client.json(response)
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise self._client.error(f"{self._client.where} answered without a transcript ('text'): {str(answer)[:80]}")
        return text.strip()

    def warm_up(self) -> None:
        """One short request (a server may load its model on first use), and the local engine's own warm-up."""
        if self._local is not None:
            self._local.warm_up()
        noise = np.random.default_rng(0).standard_normal(int(self.sample_rate * WARM_UP_SECONDS)) * 1e-3
        self._client.warm_up(lambda: self.transcribe(noise.astype(np.float32)))

    def describe(self) -> dict[str, object]:
        return {
            **self._client.describe(),
            "language": self._settings.language or "detected by the server",
            "partials": {"engine": "faster-whisper (local)", **self._local.describe()}
            if self._local is not None
            else "none (asr.local_partials = false): no interim transcripts while the user speaks",
            "why": "asr.engine = 'openai': finished utterances are transcribed by this server",
        }

    def close(self) -> None:
        self._client.close()
        if self._local is not None:
            self._local.close()

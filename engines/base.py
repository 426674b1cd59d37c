"""One interface per pipeline stage.

Every implementation lives in its own module and is created by name through
``engines.registry``; the media server only ever sees these types.

All methods here are blocking: the media server calls them from worker threads
(``asyncio.to_thread``) so model inference never blocks the event loop.
Engines are created once per process, warmed up once, and shared by every
session; per-session state lives in the stream objects they open.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from engines.avatar import Avatar


class EngineConfigError(ValueError):
    """An engine name or option in the configuration is wrong; the message says which and why."""


class EngineLoadError(RuntimeError):
    """An engine failed while loading or warming up; the message names its stage and engine."""


class EngineSettings(BaseModel):
    """Base of every engine's own settings model: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


class Engine(ABC):
    """What every engine has: a name, its settings, a warm-up and a description."""

    Settings: ClassVar[type[EngineSettings]] = EngineSettings

    def warm_up(self) -> None:
        """Run one small inference so the first real request is as fast as the tenth."""

    def describe(self) -> dict[str, object]:
        """What ``facecast doctor`` prints: model paths, hashes, device, and why."""
        return {}

    def close(self) -> None:
        """Release processes or handles the engine owns."""


# --- VAD -------------------------------------------------------------------


class VADStream(ABC):
    """Per-session VAD state (silero is recurrent)."""

    @abstractmethod
    def speech_probability(self, window: np.ndarray) -> float:
        """Probability that one window (``VADEngine.window_samples`` float32 samples at 16 kHz) is speech."""

    @abstractmethod
    def reset(self) -> None: ...


class VADEngine(Engine):
    sample_rate: ClassVar[int] = 16000
    window_samples: ClassVar[int] = 512

    @abstractmethod
    def open_stream(self) -> VADStream: ...


# --- ASR -------------------------------------------------------------------


DETECT_LANGUAGE = "auto"


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str  # the language it was transcribed in: the one asked for, or the one detected
    audio_seconds: float


class ASREngine(Engine):
    sample_rate: ClassVar[int] = 16000

    @abstractmethod
    def transcribe(self, audio: np.ndarray, *, partial: bool = False, language: str | None = None) -> Transcript:
        """Transcribe float32 mono audio at 16 kHz. ``partial`` marks an interim decode of speech still going on.

        ``language`` is a BCP-47 tag (a persona's, e.g. "de" or "pt-BR"), ``DETECT_LANGUAGE`` to detect
        it, or None for the engine's configured language."""


def primary_language(tag: str) -> str:
    """The language subtag of a BCP-47 tag, lower case: "de-AT" -> "de", "pt_BR" -> "pt"."""
    return tag.replace("_", "-").split("-")[0].lower()


# --- LLM -------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class Persona:
    name: str
    display_name: str
    system_prompt: str
    examples: tuple[tuple[str, str], ...] = ()
    language: str = "en"  # BCP-47: what the persona hears, writes and speaks

    @property
    def english(self) -> bool:
        return primary_language(self.language) == "en"


class LLMEngine(Engine):
    @abstractmethod
    def stream_reply(
        self,
        persona: Persona,
        history: list[ChatMessage],
        cancelled: Callable[[], bool],
        context: str = "",
    ) -> Iterator[str]:
        """Yield the reply to the last user message of ``history`` as text deltas.

        ``context`` holds passages from the persona's documents that the reply should answer from
        (numbered, each with its source), already within a token budget; "" when there are none.
        The engine bounds the rest of the prompt by tokens (oldest turns are dropped first) and
        stops early once ``cancelled()`` returns True.
        """

    def prepare(self, persona: Persona, history: Sequence[ChatMessage] = (), question_so_far: str = "") -> None:
        """Process what the next reply for ``persona`` after ``history`` is known to start with (at
        start-up: the persona's preamble; after an exchange: the conversation so far; while the user
        is still speaking: also ``question_so_far``, a partial transcript), so that the reply has
        little left to read. A guess at the question may be skipped while the engine is busy."""


# --- TTS -------------------------------------------------------------------


@dataclass(frozen=True)
class PhonemeTiming:
    phoneme: str
    start: float
    end: float


@dataclass(frozen=True)
class SpeechChunk:
    """Synthesised audio: a sentence, or a piece of one (a voice may send a sentence in pieces)."""

    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    text: str  # the sentence this audio is (part of)
    phonemes: tuple[PhonemeTiming, ...] | None = None  # None when the voice gives no durations
    starts_sentence: bool = True  # False for the later pieces of a sentence


class TTSEngine(Engine):
    @property
    @abstractmethod
    def voices(self) -> list[str]: ...

    @property
    @abstractmethod
    def default_voice(self) -> str: ...

    @abstractmethod
    def synthesize(self, text: str, voice: str, speed: float = 1.0) -> Iterator[SpeechChunk]:
        """Yield audio as soon as it is ready, sentence by sentence, in one or more chunks per sentence.

        ``speed`` above 1 speaks faster, below 1 slower ("say that slower"). Closing the iterator
        abandons the rest."""

    def voice_for_language(self, language: str) -> str | None:
        """The voice that best speaks ``language`` (a BCP-47 tag, e.g. a persona's); None if none is known to."""
        return None


# --- Lip-sync --------------------------------------------------------------


@dataclass
class AVFrame:
    """One tick of output: a video frame and exactly the audio it is shown with."""

    video: np.ndarray  # H x W x 3 uint8, BGR
    audio: np.ndarray  # float32 mono at the stream's sample rate, samples_per_frame long
    speech: bool = True
    segment_end: bool = False  # last frame of a pushed segment


def mono_samples(audio: np.ndarray) -> np.ndarray:
    """``audio`` as float32 mono samples, or a ValueError saying what it is instead."""
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"audio must be mono (1-D), got shape {samples.shape}")
    return samples


class LipSyncStream(ABC):
    """Per-session generator, after LiveKit's VideoGenerator: push audio in, pull frames paired with audio.

    Frame k of a segment is shown with audio samples [k*spf, (k+1)*spf) of that segment,
    where spf = sample_rate / fps, so audio and video cannot drift apart.
    """

    @abstractmethod
    def push_audio(self, audio: np.ndarray, phonemes: tuple[PhonemeTiming, ...] | None = None) -> None:
        """Append speech (float32 mono at the stream's sample rate) to the current segment."""

    @abstractmethod
    def end_segment(self) -> None:
        """No more audio for this segment: the last partial frame is padded with silence."""

    @abstractmethod
    def pull(self) -> list[AVFrame]:
        """Render every frame that the audio pushed so far allows, in order (may be empty)."""

    @abstractmethod
    def idle_frame(self, elapsed_frames: int = 1) -> np.ndarray:
        """A frame while nobody speaks (blinks, slight motion), continuous with speech frames.

        ``elapsed_frames`` ticks of 1/fps have passed since the previous frame: a caller may skip ticks,
        and the animation must keep real time. When nothing visible changed since the previous frame it
        may return that very array again (read-only): the caller then sends nothing new.
        """

    @abstractmethod
    def clear(self) -> None:
        """Barge-in: drop all pushed audio and frames not yet pulled."""


class LipSyncEngine(Engine):
    @abstractmethod
    def prepare(self, avatar: Avatar) -> None:
        """Precompute what every session of this avatar shares (face crops, features). Idempotent."""

    @abstractmethod
    def open_stream(self, avatar: Avatar, fps: int, sample_rate: int) -> LipSyncStream: ...

    def use_enhancer(self, enhancer: FaceEnhancer) -> None:
        """Restore every generated face with ``enhancer`` before it is pasted into the frame."""
        raise EngineConfigError(
            f"the {type(self).__name__} lip-sync engine generates no face to enhance: "
            "use the face enhancer with lipsync.engine = 'wav2lip', or remove the [enhancer] section"
        )


# --- Face enhancer -----------------------------------------------------------


class FaceEnhancer(Engine):
    @abstractmethod
    def enhance(self, face_bgr: np.ndarray) -> np.ndarray:
        """Restore one face crop (H x W x 3 uint8 BGR) and return it at the same size."""


@dataclass
class EngineSet:
    """The engines one server process shares across all its sessions."""

    vad: VADEngine
    asr: ASREngine
    llm: LLMEngine
    tts: TTSEngine
    lipsync: LipSyncEngine
    enhancer: FaceEnhancer | None = None
    descriptions: dict[str, dict[str, object]] = field(default_factory=dict)

    def close(self) -> None:
        for engine in (self.vad, self.asr, self.llm, self.tts, self.lipsync, self.enhancer):
            if engine is not None:
                engine.close()

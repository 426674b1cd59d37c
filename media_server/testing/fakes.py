"""Scripted engines: the conversation's state machine tested in milliseconds, deterministically, whatever
else the machine is doing. Each does exactly what its script says and records what it was asked."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from engines.avatar import Avatar, FaceBox
from engines.base import (
    DETECT_LANGUAGE,
    ASREngine,
    AVFrame,
    ChatMessage,
    EngineSet,
    LipSyncEngine,
    LipSyncStream,
    LLMEngine,
    Persona,
    PhonemeTiming,
    SpeechChunk,
    Transcript,
    TTSEngine,
    VADEngine,
    VADStream,
    mono_samples,
)
from engines.knowledge import Passage

FRAME_SIZE = (64, 48)  # width, height of the numbered frames


class ScriptedVAD(VADEngine):
    """Speech probabilities from a script, one per window, shared by every stream (a test has one)."""

    def __init__(self) -> None:
        self.script: deque[float] = deque()

    def speak(self, seconds: float, probability: float = 0.9) -> int:
        """Script ``seconds`` of voice (or, with a low probability, silence); returns the windows it takes."""
        windows = math.ceil(seconds * self.sample_rate / self.window_samples - 1e-9)
        self.script.extend([probability] * windows)
        return windows

    def open_stream(self) -> VADStream:
        return _ScriptedVADStream(self.script)


class _ScriptedVADStream(VADStream):
    def __init__(self, script: deque[float]) -> None:
        self._script = script

    def speech_probability(self, window: np.ndarray) -> float:
        return self._script.popleft() if self._script else 0.0

    def reset(self) -> None:
        self._script.clear()


class FixedASR(ASREngine):
    """Returns ``text`` for every final decode and ``partial_text`` for every partial one, in the language
    asked for, or ``detected`` when asked to detect it."""

    def __init__(
        self, text: str = "What is the capital of France?", partial_text: str = "What is the", detected: str = "en"
    ) -> None:
        self.text, self.partial_text, self.detected = text, partial_text, detected
        self.decoded: list[tuple[int, bool]] = []  # (samples, partial) of each call
        self.languages: list[str | None] = []  # the language each call asked for

    def transcribe(self, audio: np.ndarray, *, partial: bool = False, language: str | None = None) -> Transcript:
        self.decoded.append((len(audio), partial))
        self.languages.append(language)
        spoken = self.detected if language in (None, DETECT_LANGUAGE) else language
        return Transcript(self.partial_text if partial else self.text, spoken, len(audio) / self.sample_rate)


class ScriptedLLM(LLMEngine):
    """Yields its script's deltas. With ``gated``, each delta waits until ``release()`` lets it through, so a
    test decides exactly when the reply goes on (or that it never does)."""

    def __init__(self, deltas: Sequence[str] = ("The capital", " of France", " is Paris."), gated: bool = False) -> None:
        self.deltas = list(deltas)
        self.gated = gated
        self._gate = threading.Semaphore(0)
        self.asked: list[list[ChatMessage]] = []
        self.contexts: list[str] = []  # the passages each reply was given
        self.prepared: list[str] = []
        self.cancelled_seen = threading.Event()
        self.failure: Exception | None = None
        self.written = 0  # deltas of the last reply taken by the consumer

    def release(self, deltas: int = 1) -> None:
        for _ in range(deltas):
            self._gate.release()

    def stream_reply(
        self, persona: Persona, history: list[ChatMessage], cancelled: Callable[[], bool], context: str = ""
    ) -> Iterator[str]:
        self.asked.append(list(history))
        self.contexts.append(context)
        if self.failure is not None:
            raise self.failure
        self.written = 0
        try:
            for delta in self.deltas:
                while self.gated and not self._gate.acquire(timeout=0.01):
                    if cancelled():
                        return
                if cancelled():
                    return
                yield delta
                self.written += 1
        finally:  # cancelled, closed by the consumer, or done
            if self.written < len(self.deltas):
                self.cancelled_seen.set()

    def prepare(self, persona: Persona, history: Sequence[ChatMessage] = (), question_so_far: str = "") -> None:
        self.prepared.append(question_so_far)


class ScriptedKnowledge:
    """Knowledge bases whose searches return their passages, whatever the question; records each search."""

    def __init__(self, bases: dict[str, list[Passage]]) -> None:
        self.bases = bases
        self.searched: list[tuple[tuple[str, ...], str]] = []

    def existing(self, bases: Sequence[str]) -> list[str]:
        return [name for name in bases if name in self.bases]

    def search(self, bases: Sequence[str], question: str) -> list[Passage]:
        self.searched.append((tuple(bases), question))
        return [passage for name in bases for passage in self.bases[name]]


class ToneTTS(TTSEngine):
    """A tone per text, ``seconds_per_word`` long per word, in pieces of ``piece_s`` (like a streaming voice).
    ``hold`` (cleared) makes every text wait before its first piece until it is set."""

    sample_rate = 16000

    def __init__(self, seconds_per_word: float = 0.1, piece_s: float = 0.2) -> None:
        self.seconds_per_word, self.piece_s = seconds_per_word, piece_s
        self.spoken: list[tuple[str, float]] = []
        self.hold = threading.Event()
        self.hold.set()

    @property
    def voices(self) -> list[str]:
        return ["tone"]

    @property
    def default_voice(self) -> str:
        return "tone"

    def synthesize(self, text: str, voice: str, speed: float = 1.0) -> Iterator[SpeechChunk]:
        self.spoken.append((text, speed))
        self.hold.wait()
        samples = int(len(text.split()) * self.seconds_per_word / speed * self.sample_rate)
        tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(samples) / self.sample_rate)).astype(np.float32)
        piece = int(self.piece_s * self.sample_rate)
        for start in range(0, samples, piece):
            yield SpeechChunk(tone[start : start + piece], self.sample_rate, text, starts_sentence=start == 0)


class NumberedLipSync(LipSyncEngine):
    """Frames whose first pixel holds their number in the segment (idle frames: 0), with exactly their audio."""

    def prepare(self, avatar: Avatar) -> None:
        pass

    def open_stream(self, avatar: Avatar, fps: int, sample_rate: int) -> LipSyncStream:
        return NumberedStream(sample_rate // fps)


class NumberedStream(LipSyncStream):
    """The lip-sync contract at its simplest: one frame per ``spf`` samples, the last held back until the
    segment ends (so it can say it is the last)."""

    def __init__(self, samples_per_frame: int) -> None:
        self.spf = samples_per_frame
        self._pending = np.zeros(0, np.float32)
        self._ended = False
        self._number = 0
        self._idle = numbered_picture(0)
        self._idle.flags.writeable = False  # handed out again and again, as a still picture is

    def push_audio(self, audio: np.ndarray, phonemes: tuple[PhonemeTiming, ...] | None = None) -> None:
        if self._ended:
            self._ended, self._number = False, 0
        self._pending = np.concatenate([self._pending, mono_samples(audio)])

    def end_segment(self) -> None:
        if self._pending.size:
            self._pending = np.concatenate([self._pending, np.zeros(-len(self._pending) % self.spf, np.float32)])
            self._ended = True

    def pull(self) -> list[AVFrame]:
        ready = len(self._pending) // self.spf - (0 if self._ended else 1)
        frames = [self._frame(self._pending[k * self.spf : (k + 1) * self.spf]) for k in range(max(ready, 0))]
        self._pending = self._pending[max(ready, 0) * self.spf :]
        if self._ended and frames:
            frames[-1].segment_end = True
        return frames

    def _frame(self, audio: np.ndarray) -> AVFrame:
        self._number += 1
        return AVFrame(numbered_picture(self._number), audio.copy())

    def idle_frame(self, elapsed_frames: int = 1) -> np.ndarray:
        return self._idle

    def clear(self) -> None:
        self._pending = np.zeros(0, np.float32)
        self._ended = False


def numbered_picture(number: int) -> np.ndarray:
    picture = np.zeros((FRAME_SIZE[1], FRAME_SIZE[0], 3), np.uint8)
    picture[0, 0] = (number % 256, number // 256 % 256, 0)
    return picture


def picture_number(picture: np.ndarray) -> int:
    return int(picture[0, 0, 0]) + 256 * int(picture[0, 0, 1])


def blank_avatar() -> Avatar:
    width, height = FRAME_SIZE
    frame = np.zeros((height, width, 3), np.uint8)
    return Avatar("blank", "Blank", Path("."), (frame,), (FaceBox(16, 8, 48, 40),), "0" * 64)


def scripted_engines(
    vad: ScriptedVAD | None = None,
    asr: ASREngine | None = None,
    llm: LLMEngine | None = None,
    tts: TTSEngine | None = None,
    lipsync: LipSyncEngine | None = None,
) -> EngineSet:
    return EngineSet(
        vad=vad or ScriptedVAD(),
        asr=asr or FixedASR(),
        llm=llm or ScriptedLLM(),
        tts=tts or ToneTTS(),
        lipsync=lipsync or NumberedLipSync(),
    )

"""The user's side of a conversation: microphone windows → VAD (less the avatar's own echo) → the turn
policy's events, with the audio of what the user is saying. Partial transcripts are decoded from it
while they speak.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from engines.base import ASREngine, VADEngine
from media_server.config import Settings
from media_server.conversation.echo_guard import EchoGuard
from media_server.conversation.turn_policy import TurnEvent, TurnPolicy
from media_server.metrics import ServerMetrics

log = logging.getLogger(__name__)
MIN_PARTIAL_SECONDS = 0.6


class Listener:
    def __init__(
        self,
        vad: VADEngine,
        settings: Settings,
        metrics: ServerMetrics,
        *,
        on_turn_event: Callable[[TurnEvent], None],
        avatar_busy: Callable[[], bool],
    ) -> None:
        self.settings = settings.turn_taking
        self.metrics = metrics
        self.window_samples = vad.window_samples
        self.window_s = vad.window_samples / vad.sample_rate
        self._vad = vad.open_stream()
        self._policy = TurnPolicy(self.settings, self.window_s)
        self._on_turn_event = on_turn_event
        self._avatar_busy = avatar_busy
        self._pre_roll: deque[np.ndarray] = deque(maxlen=max(1, int(self.settings.pre_roll_ms / 1000 / self.window_s)))
        self._utterance: list[np.ndarray] = []
        self.audio_time = 0.0  # seconds of microphone audio heard so far
        echo = settings.echo
        self.echo_guard = EchoGuard(vad.sample_rate, threshold=echo.correlation) if echo.guard else None

    def on_window(self, window: np.ndarray, captured_until: float) -> None:
        """One VAD window of 16 kHz microphone audio, whose last sample was captured at ``captured_until``."""
        probability = self._vad.speech_probability(window)
        if self.echo_guard is not None:
            self.echo_guard.heard(window, captured_until)
            if probability >= self.settings.vad_threshold and self.echo_guard.is_echo():
                probability = 0.0  # the avatar hearing itself through the client's speakers
                self.metrics.echo_windows.inc()
        window_start = self.audio_time
        self.audio_time += self.window_s
        if self._policy.user_speaking:
            self._utterance.append(window)
        else:
            self._pre_roll.append(window)
        for event in self._policy.on_window(probability, window_start, self._avatar_busy()):
            self._on_turn_event(event)

    def avatar_played(self, pcm: np.ndarray, at: float) -> None:
        """The avatar's audio (int16 at 48 kHz) left for the client at ``at``: what the echo guard compares with."""
        if self.echo_guard is not None:
            self.echo_guard.played(pcm / 32768.0, at)

    def wall_time_of(self, audio_time: float) -> float:
        """Mic audio arrives in real time, so an instant of it maps back to a wall-clock instant."""
        return time.monotonic() - (self.audio_time - audio_time)

    def start_utterance(self) -> None:
        """The user started speaking: their utterance begins with the audio just before it was detected."""
        self._utterance = list(self._pre_roll)
        self._pre_roll.clear()

    def take_utterance(self) -> np.ndarray:
        audio = np.concatenate(self._utterance) if self._utterance else np.zeros(0, np.float32)
        self._utterance = []
        return audio

    def utterance_so_far(self) -> np.ndarray:
        return np.concatenate(self._utterance) if self._utterance else np.zeros(0, np.float32)

    @property
    def utterance_s(self) -> float:
        return len(self._utterance) * self.window_s

    def speculative_audio(self) -> np.ndarray:
        """The utterance so far, with the silence that would end it appended, so the speculative decode
        sees the same audio as the one at the confirmed end of the turn."""
        policy = self._policy
        missing = policy.windows_for(self.settings.min_silence_ms) - policy.windows_for(
            self.settings.speculative_silence_ms
        )
        return np.concatenate([*self._utterance, np.zeros(missing * self.window_samples, np.float32)])

    def pausing(self) -> bool:
        """The user is silent right now (mid-utterance or not)."""
        return self.audio_time - self._policy.last_voiced_end > self.window_s


async def partial_transcripts(
    listener: Listener,
    asr: ASREngine,
    language: str,
    interval_s: float,
    skip: Callable[[], bool],
    on_partial: Callable[[str], Awaitable[None]],
) -> None:
    """While the user speaks, decode what they have said so far (in ``language``, a BCP-47 tag or
    DETECT_LANGUAGE) every ``interval_s`` and hand it on."""
    while True:
        await asyncio.sleep(interval_s)
        # Not in a pause either: it may be the end of the turn, and the final decode would queue behind this one.
        if skip() or listener.pausing() or listener.utterance_s < MIN_PARTIAL_SECONDS:
            continue
        audio = listener.utterance_so_far()
        transcript = await asyncio.to_thread(asr.transcribe, audio, partial=True, language=language)
        if transcript.text:
            await on_partial(transcript.text)

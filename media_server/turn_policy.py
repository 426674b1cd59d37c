"""Turn-taking as an explicit policy: it sees speech probabilities and says when the user
started, stopped, or interrupted the avatar. No audio, no models: testable on numbers alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from media_server.config import TurnSettings

# Once speech has started, a slightly lower probability still counts as voiced, so soft word
# endings do not chop an utterance.
HYSTERESIS = 0.15


class TurnEventKind(Enum):
    USER_STARTED = "user_started"
    USER_ENDED = "user_ended"
    INTERRUPT = "interrupt"


@dataclass(frozen=True)
class TurnEvent:
    kind: TurnEventKind
    at: float  # session audio time in seconds: start of speech, or end of the last voiced window


class TurnPolicy:
    def __init__(self, settings: TurnSettings, window_s: float) -> None:
        self.settings = settings
        self.window_s = window_s
        self.user_speaking = False
        self._voiced_since: float | None = None
        self._last_voiced_end = 0.0
        self._started_at = 0.0
        self._interrupted = False

    def on_window(self, probability: float, window_start: float, avatar_speaking: bool) -> list[TurnEvent]:
        threshold = self.settings.vad_threshold - (HYSTERESIS if self.user_speaking else 0.0)
        if probability >= threshold:
            return self._voiced(window_start, avatar_speaking)
        return self._unvoiced(window_start)

    def _voiced(self, window_start: float, avatar_speaking: bool) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        if self._voiced_since is None:
            self._voiced_since = window_start
        self._last_voiced_end = window_start + self.window_s
        voiced_ms = (self._last_voiced_end - self._voiced_since) * 1000
        if avatar_speaking and not self._interrupted and voiced_ms >= self.settings.min_interruption_ms:
            self._interrupted = True
            events.append(TurnEvent(TurnEventKind.INTERRUPT, self._voiced_since))
        if not self.user_speaking and voiced_ms >= self.settings.min_speech_ms:
            self.user_speaking = True
            self._started_at = self._voiced_since
            events.append(TurnEvent(TurnEventKind.USER_STARTED, self._voiced_since))
        if self.user_speaking and self._last_voiced_end - self._started_at >= self.settings.max_utterance_s:
            events.append(self._end())
        return events

    def _unvoiced(self, window_start: float) -> list[TurnEvent]:
        if not self.user_speaking:
            self._voiced_since = None
            self._interrupted = False
            return []
        if (window_start + self.window_s - self._last_voiced_end) * 1000 >= self.settings.min_silence_ms:
            return [self._end()]
        return []

    def _end(self) -> TurnEvent:
        self.user_speaking = False
        self._voiced_since = None
        self._interrupted = False
        return TurnEvent(TurnEventKind.USER_ENDED, self._last_voiced_end)

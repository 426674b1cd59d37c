"""Turn-taking as an explicit policy: it sees speech probabilities and says when the user started,
paused, resumed, finished, or interrupted the avatar. No audio, no models: testable on numbers alone.

While the avatar is speaking, voice from the user first *pauses* the avatar (within a few windows),
and only voice that lasts ``min_interruption_ms`` *interrupts* it; a shorter sound (a cough, a
"hm") resumes the avatar where it paused, once ``false_interruption_timeout_ms`` of silence follows.
A short silence marks the user as *paused*, so the reply can be prepared speculatively; it is
confirmed once the silence reaches ``min_silence_ms``, or dropped if the user goes on talking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from media_server.config import TurnTakingSettings

# Once speech has started, a slightly lower probability still counts as voiced, so soft word
# endings do not chop an utterance.
HYSTERESIS = 0.15
# Silence shorter than this between voiced windows still counts as one stretch of voice ("wait, stop").
VOICE_GAP_MS = 200
# ...but a stretch must be mostly voice to count as speech: scattered voiced windows (residual echo
# of the avatar, clatter) bridged by those gaps would otherwise add up to an interruption.
MIN_VOICED_SHARE = 0.6


class TurnEventKind(Enum):
    USER_STARTED = "user_started"
    USER_PAUSED = "user_paused"
    USER_RESUMED = "user_resumed"
    USER_ENDED = "user_ended"
    AVATAR_PAUSE = "avatar_pause"
    AVATAR_RESUME = "avatar_resume"
    INTERRUPT = "interrupt"


@dataclass(frozen=True)
class TurnEvent:
    kind: TurnEventKind
    at: float  # session audio time (s): start of the voice, or end of the last voiced window


class TurnPolicy:
    def __init__(self, settings: TurnTakingSettings, window_s: float) -> None:
        self.settings = settings
        self.window_s = window_s
        self.user_speaking = False
        self._voiced_since: float | None = None
        self._voiced_windows = 0  # in the stretch since _voiced_since
        self._last_voiced_end = 0.0
        self._started_at = 0.0
        self._user_paused = False
        self._avatar_paused = False
        self._interrupted = False

    @property
    def last_voiced_end(self) -> float:
        return self._last_voiced_end

    def windows_for(self, ms: float) -> int:
        """Silence is counted in whole windows: this many make ``ms``."""
        return math.ceil(ms / 1000 / self.window_s - 1e-6)

    def on_window(self, probability: float, window_start: float, avatar_busy: bool) -> list[TurnEvent]:
        threshold = self.settings.vad_threshold - (HYSTERESIS if self.user_speaking else 0.0)
        if probability >= threshold:
            return self._voiced(window_start, avatar_busy)
        return self._unvoiced(window_start)

    def _voiced(self, window_start: float, avatar_busy: bool) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        if self._voiced_since is None:
            self._voiced_since = window_start
            self._voiced_windows = 0
        self._voiced_windows += 1
        self._last_voiced_end = window_start + self.window_s
        voiced_ms = (self._last_voiced_end - self._voiced_since) * 1000
        if self._user_paused:
            self._user_paused = False
            events.append(TurnEvent(TurnEventKind.USER_RESUMED, window_start))
        if avatar_busy and not self._interrupted:
            if not self._avatar_paused and voiced_ms >= self.settings.pause_avatar_after_ms:
                self._avatar_paused = True
                events.append(TurnEvent(TurnEventKind.AVATAR_PAUSE, self._voiced_since))
            if self._sustained(voiced_ms, self.settings.min_interruption_ms):
                self._interrupted = True
                self._avatar_paused = False
                events.append(TurnEvent(TurnEventKind.INTERRUPT, self._voiced_since))
        needed_ms = self.settings.min_interruption_ms if avatar_busy else self.settings.min_speech_ms
        if not self.user_speaking and self._sustained(voiced_ms, needed_ms):
            self.user_speaking = True
            self._started_at = self._voiced_since
            events.append(TurnEvent(TurnEventKind.USER_STARTED, self._voiced_since))
        if self.user_speaking and self._last_voiced_end - self._started_at >= self.settings.max_utterance_s:
            events.append(self._end())
        return events

    def _sustained(self, stretch_ms: float, needed_ms: float) -> bool:
        """Whether the current stretch of voice is long enough and mostly voiced."""
        voiced_share = self._voiced_windows * self.window_s * 1000 / stretch_ms
        return stretch_ms >= needed_ms and voiced_share >= MIN_VOICED_SHARE

    def _unvoiced(self, window_start: float) -> list[TurnEvent]:
        # Rounded to whole windows: the audio clock's float sum must not add or lose a window.
        silent_windows = round((window_start + self.window_s - self._last_voiced_end) / self.window_s)
        if not self.user_speaking:
            if silent_windows >= self.windows_for(
                VOICE_GAP_MS
            ):  # shorter gaps are between words of one stretch of speech
                self._voiced_since = None
            if self._avatar_paused and silent_windows >= self.windows_for(self.settings.false_interruption_timeout_ms):
                self._avatar_paused = False
                self._interrupted = False
                return [TurnEvent(TurnEventKind.AVATAR_RESUME, self._last_voiced_end)]
            if not self._avatar_paused:
                self._interrupted = False
            return []
        if silent_windows >= self.windows_for(self.settings.min_silence_ms):
            return [self._end()]
        speculative_ms = self.settings.speculative_silence_ms
        if speculative_ms and not self._user_paused and silent_windows >= self.windows_for(speculative_ms):
            self._user_paused = True
            return [TurnEvent(TurnEventKind.USER_PAUSED, self._last_voiced_end)]
        return []

    def _end(self) -> TurnEvent:
        self.user_speaking = False
        self._user_paused = False
        self._voiced_since = None
        self._interrupted = False
        self._avatar_paused = False
        return TurnEvent(TurnEventKind.USER_ENDED, self._last_voiced_end)

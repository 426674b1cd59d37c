"""Keeps the avatar from interrupting itself when its own voice comes back through a kiosk's speakers.

Browsers cancel most echo; what leaks through is the avatar's audio, delayed and attenuated. The
guard keeps what the session sent (as the WebRTC sender takes it, so audio queued behind a busy
encoder does not count as older than it is), stamped with when it was sent, and the last
``context_s`` of what the microphone heard, stamped with when it was captured (``CaptureClock``).
It flags the microphone as echo when that stretch correlates strongly with a stretch of the output
sent up to ``max_delay_s`` before it was captured. Comparing capture time with send time keeps the
delay searched to the echo path itself (network, playout, the room): a server that processes the
microphone late, because it is busy, still finds the echo. Both signals are pre-emphasised first:
voiced speech is dominated by low, periodic harmonics, and any two voices then correlate by chance
over a few tens of milliseconds. Over 200 ms of pre-emphasised sound a user talking over the avatar
does not correlate with it, so real interruptions get through at once.
"""

from __future__ import annotations

import numpy as np

DECIMATION = 3  # 48 kHz output to the 16 kHz microphone rate
PRE_EMPHASIS = 0.97
# A packet sent less than this after the previous one ended follows it directly (senders jitter);
# a longer pause (silence that was not recorded, a stalled sender) is recorded as silence.
SEND_GAP_S = 0.03


def _pre_emphasised(audio: np.ndarray, previous: float) -> np.ndarray:
    return audio - PRE_EMPHASIS * np.concatenate([[previous], audio[:-1]])


def max_correlation(reference: np.ndarray, heard: np.ndarray) -> float:
    """Highest normalised cross-correlation of ``heard`` with any stretch of ``reference``."""
    heard = heard.astype(np.float64)
    heard_energy = float(heard @ heard)
    if heard_energy < 1e-8 or len(reference) < len(heard):
        return 0.0
    reference = reference.astype(np.float64)
    size = 1 << int(np.ceil(np.log2(len(reference) + len(heard))))
    products = np.fft.irfft(np.fft.rfft(reference, size) * np.conj(np.fft.rfft(heard, size)), size)
    lags = len(reference) - len(heard) + 1
    dots = products[:lags]
    energy = np.concatenate([[0.0], np.cumsum(reference**2)])
    stretch_energy = energy[len(heard) : len(heard) + lags] - energy[:lags]
    valid = stretch_energy > 1e-8
    if not np.any(valid):
        return 0.0
    correlation = np.abs(dots[valid]) / np.sqrt(stretch_energy[valid] * heard_energy)
    return float(correlation.max())


class EchoGuard:
    """``played`` and ``heard`` take times on one clock (``time.monotonic()`` in the server)."""

    def __init__(
        self,
        sample_rate: int = 16000,
        max_delay_s: float = 1.6,
        threshold: float = 0.4,
        context_s: float = 0.2,
        history_s: float = 5.0,
    ) -> None:
        self.rate = sample_rate
        self.threshold = threshold
        # History: the searched delay, plus up to ~3 s for the microphone's audio to be processed late.
        # The search, with the 0.2 s context, fits one 32768-point FFT at 16 kHz.
        self._history = np.zeros(int(sample_rate * history_s), np.float32)
        self._history_end: float | None = None  # when the last recorded sample ends
        self._searched = int(sample_rate * (max_delay_s + context_s))
        self._heard = np.zeros(int(sample_rate * context_s), np.float32)
        self._heard_until = 0.0
        self._last_played = 0.0
        self._last_heard = 0.0
        self._sound_until: float | None = None  # when the last packet with sound ends

    def played(self, audio_48k: np.ndarray, at: float) -> None:
        """Record one packet of output audio, sent at ``at``."""
        has_sound = bool(audio_48k.any())
        if not has_sound and (self._sound_until is None or at - self._sound_until > len(self._history) / self.rate):
            return  # the history is all silence: the pause is recorded with the next sound
        decimated = audio_48k[: len(audio_48k) // DECIMATION * DECIMATION].reshape(-1, DECIMATION).mean(axis=1)
        starts = at
        if self._history_end is not None:
            if at - self._history_end <= SEND_GAP_S:
                starts = self._history_end
            else:
                self._shift_in(
                    np.zeros(min(len(self._history), round((at - self._history_end) * self.rate)), np.float32)
                )
        emphasised = _pre_emphasised(decimated, self._last_played)
        self._last_played = float(decimated[-1]) if len(decimated) else self._last_played
        self._shift_in(emphasised.astype(np.float32))
        self._history_end = starts + len(decimated) / self.rate
        if has_sound:
            self._sound_until = self._history_end

    def _shift_in(self, samples: np.ndarray) -> None:
        self._history = np.concatenate([self._history[len(samples) :], samples])

    def heard(self, window: np.ndarray, captured_until: float) -> None:
        """Record one microphone window (every one, so the context is contiguous), whose last sample
        was captured at ``captured_until``."""
        emphasised = _pre_emphasised(window, self._last_heard)
        self._last_heard = float(window[-1])
        self._heard = np.concatenate([self._heard[len(emphasised) :], emphasised.astype(np.float32)])
        self._heard_until = captured_until

    def is_echo(self) -> bool:
        """Whether what the microphone heard last is the avatar's own output, sent shortly before."""
        if self._sound_until is None or self._history_end is None:
            return False
        newer_than_heard = max(0, round((self._history_end - self._heard_until) * self.rate))
        end = len(self._history) - min(newer_than_heard, len(self._history))
        reference = self._history[max(0, end - self._searched) : end]
        if not reference.any():
            return False  # the avatar was silent then
        return max_correlation(reference, self._heard) >= self.threshold

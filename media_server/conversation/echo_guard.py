"""Keeps the avatar from interrupting itself when its own voice comes back through a kiosk's speakers.

Browsers cancel most echo; what leaks through is the avatar's audio, delayed and attenuated. The
guard keeps what the session sent (as the WebRTC sender takes it, so audio queued behind a busy
encoder does not count as older than it is), stamped with when it was sent, and the last
``context_s`` of what the microphone heard, stamped with when it was captured (``CaptureClock``).
It flags the microphone as echo when that stretch correlates strongly with output sent up to
``max_delay_s`` before it was captured and not after. Comparing capture time with send time keeps the
search to the echo path itself (network, playout, the room): a server that processes the microphone
late, because it is busy, still finds the echo.

Both signals are filtered first. Pre-emphasis: voiced speech is dominated by low, periodic harmonics,
and any two voices then correlate by chance over a few tens of milliseconds. A 4 kHz low-pass: Opus
codes the noise-like sound above it (fricatives) by its spectrum, not its waveform, so after two Opus
hops it no longer correlates with what was sent. Over 200 ms of sound so filtered, a user talking over
the avatar does not correlate with it, so real interruptions get through at once.
"""

from __future__ import annotations

import bisect
import operator
from collections import deque
from dataclasses import dataclass

import numpy as np

DECIMATION = 3  # 48 kHz output to the 16 kHz microphone rate
PRE_EMPHASIS = 0.97
# A packet sent less than this after the previous one ended follows it directly (senders jitter);
# a longer pause (silence that was not recorded, a stalled sender) is recorded as silence.
SEND_GAP_S = 0.03


LOW_PASS_HZ = 4000
LOW_PASS_TAPS = 33


def _comparison_filter(sample_rate: int) -> np.ndarray:
    """Pre-emphasis followed by a windowed-sinc low-pass, as one FIR filter."""
    cutoff = LOW_PASS_HZ / sample_rate
    offsets = np.arange(LOW_PASS_TAPS) - (LOW_PASS_TAPS - 1) / 2
    low_pass = 2 * cutoff * np.sinc(2 * cutoff * offsets) * np.hamming(LOW_PASS_TAPS)
    return np.convolve([1.0, -PRE_EMPHASIS], low_pass / low_pass.sum())


class _StreamFilter:
    """An FIR filter applied to a stream in pieces, as if to the whole."""

    def __init__(self, taps: np.ndarray) -> None:
        self._taps = taps
        self._tail = np.zeros(len(taps) - 1, np.float64)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        extended = np.concatenate([self._tail, samples])
        self._tail = extended[len(extended) - len(self._tail) :]
        return np.convolve(extended, self._taps, mode="valid").astype(np.float32)


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


@dataclass(frozen=True)
class _SentPacket:
    sent_at: float
    start: int  # its samples in the history, counted from the first ever recorded
    end: int


SEND_TIME = operator.attrgetter("sent_at")


class EchoGuard:
    """``played`` and ``heard`` take times on one clock (``time.monotonic()`` in the server)."""

    def __init__(
        self,
        sample_rate: int = 16000,
        max_delay_s: float = 1.6,
        threshold: float = 0.45,
        context_s: float = 0.2,
        history_s: float = 5.0,
    ) -> None:
        self.rate = sample_rate
        self.threshold = threshold
        self.max_delay_s = max_delay_s
        # History: the searched delay, plus up to ~3 s for the microphone's audio to be processed late.
        self._history = np.zeros(int(sample_rate * history_s), np.float32)
        self._recorded = 0  # samples ever shifted into the history
        self._sent: deque[_SentPacket] = deque()
        self._history_end: float | None = None  # when the sound sent so far ends, played without a break
        self._heard = np.zeros(int(sample_rate * context_s), np.float32)
        self._heard_until = 0.0
        taps = _comparison_filter(sample_rate)
        self._filter_played, self._filter_heard = _StreamFilter(taps), _StreamFilter(taps)
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
        start = self._recorded
        self._shift_in(self._filter_played(decimated))
        self._sent.append(_SentPacket(at, start, self._recorded))
        while self._sent and self._sent[0].start < self._recorded - len(self._history):
            self._sent.popleft()
        self._history_end = starts + len(decimated) / self.rate
        if has_sound:
            self._sound_until = at + len(decimated) / self.rate

    def _shift_in(self, samples: np.ndarray) -> None:
        self._history = np.concatenate([self._history[len(samples) :], samples])
        self._recorded += len(samples)

    def heard(self, window: np.ndarray, captured_until: float) -> None:
        """Record one microphone window (every one, so the context is contiguous), whose last sample
        was captured at ``captured_until``."""
        filtered = self._filter_heard(window)
        self._heard = np.concatenate([self._heard[len(filtered) :], filtered])
        self._heard_until = captured_until

    def _reference(self) -> np.ndarray:
        """The output that can have been heard in the context: sent before its end was captured, and
        at most ``max_delay_s`` before its start. Bounded by send time, not by position in the history,
        because a receiver's jitter buffer plays a burst of packets at a pace of its own."""
        last = bisect.bisect_right(self._sent, self._heard_until, key=SEND_TIME) - 1
        if last < 0:
            return self._history[:0]
        first = bisect.bisect_left(self._sent, self._heard_until - self.max_delay_s, hi=last, key=SEND_TIME)
        oldest = self._recorded - len(self._history)
        # The context's first sample may echo output sent up to a context before that packet: the
        # history holds it (silence before the first packet of a reply included).
        start = max(0, self._sent[first].start - oldest - len(self._heard))
        return self._history[start : self._sent[last].end - oldest]

    def is_echo(self) -> bool:
        """Whether what the microphone heard last is the avatar's own output, sent shortly before."""
        if self._sound_until is None:
            return False
        reference = self._reference()
        if not reference.any():
            return False  # the avatar was silent then
        return max_correlation(reference, self._heard) >= self.threshold

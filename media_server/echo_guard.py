"""Keeps the avatar from interrupting itself when its own voice comes back through a kiosk's speakers.

Browsers cancel most echo; what leaks through is the avatar's audio, delayed and attenuated. The
guard keeps the last 1.8 s of what the session sent (as the WebRTC sender takes it, so audio
queued behind a busy encoder does not count as older than it is) and the last ``context_s`` of what the
microphone heard, and flags the microphone as echo when that stretch correlates strongly with a
stretch of the output at one delay. Both are pre-emphasised first: voiced speech is dominated by
low, periodic harmonics, and any two voices then correlate by chance over a few tens of
milliseconds. Over 200 ms of pre-emphasised sound a user talking over the avatar does not
correlate with it, so real interruptions get through at once.
"""

from __future__ import annotations

import numpy as np

DECIMATION = 3  # 48 kHz output to the 16 kHz microphone rate
# History: echo that comes back up to ~1.6 s late (a loaded machine, a slow network) is still found,
# and with the 0.2 s context it still fits one 32768-point FFT at 16 kHz, the size 1 s needed too.
PRE_EMPHASIS = 0.97


def _pre_emphasised(audio: np.ndarray, previous: float) -> np.ndarray:
    return audio - PRE_EMPHASIS * np.concatenate([[previous], audio[:-1]])


class EchoGuard:
    def __init__(
        self, sample_rate: int = 16000, history_s: float = 1.8, threshold: float = 0.4, context_s: float = 0.2
    ) -> None:
        self.threshold = threshold
        self._history = np.zeros(int(sample_rate * history_s), np.float32)
        self._heard = np.zeros(int(sample_rate * context_s), np.float32)
        self._last_played = 0.0
        self._last_heard = 0.0
        self._played_recently = False

    def played(self, audio_48k: np.ndarray) -> None:
        """Record one packet of output audio (silence too, so the history stays aligned in time)."""
        if not self._played_recently and not audio_48k.any():
            return  # the history is all silence already: shifting more in changes nothing
        decimated = audio_48k[: len(audio_48k) // DECIMATION * DECIMATION].reshape(-1, DECIMATION).mean(axis=1)
        emphasised = _pre_emphasised(decimated, self._last_played)
        self._last_played = float(decimated[-1]) if len(decimated) else self._last_played
        self._history = np.concatenate([self._history[len(emphasised) :], emphasised.astype(np.float32)])
        self._played_recently = bool(np.any(audio_48k)) or self._played_recently and bool(np.any(self._history))

    def heard(self, window: np.ndarray) -> None:
        """Record one microphone window (every one, so the context is contiguous)."""
        emphasised = _pre_emphasised(window, self._last_heard)
        self._last_heard = float(window[-1])
        self._heard = np.concatenate([self._heard[len(emphasised) :], emphasised.astype(np.float32)])

    def is_echo(self) -> bool:
        """Whether what the microphone heard last is the avatar's own recent output."""
        if not self._played_recently:
            return False
        return self.max_correlation(self._heard) >= self.threshold

    def max_correlation(self, heard: np.ndarray) -> float:
        """Highest normalised cross-correlation of ``heard`` with any stretch of the recent output."""
        heard = heard.astype(np.float64)
        heard_energy = float(heard @ heard)
        if heard_energy < 1e-8:
            return 0.0
        reference = self._history.astype(np.float64)
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

"""Keeps the avatar from interrupting itself when its own voice comes back through a kiosk's speakers.

Browsers cancel most echo; what leaks through is the avatar's audio, delayed and attenuated. The
guard keeps the last second of what the session played and flags a microphone window as echo when
it correlates strongly with some recent stretch of it. A user talking over the avatar does not
correlate with the avatar's voice, so real interruptions still get through.
"""

from __future__ import annotations

import numpy as np

DECIMATION = 3  # 48 kHz output to the 16 kHz microphone rate


class EchoGuard:
    def __init__(self, sample_rate: int = 16000, history_s: float = 1.0, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self._history = np.zeros(int(sample_rate * history_s), np.float32)
        self._played_recently = False

    def played(self, audio_48k: np.ndarray, speech: bool) -> None:
        """Record one tick of output audio (silence too, so the history stays aligned in time)."""
        decimated = audio_48k[: len(audio_48k) // DECIMATION * DECIMATION].reshape(-1, DECIMATION).mean(axis=1)
        self._history = np.concatenate([self._history[len(decimated) :], decimated.astype(np.float32)])
        self._played_recently = speech or self._played_recently and bool(np.any(self._history))

    def is_echo(self, window: np.ndarray) -> bool:
        if not self._played_recently:
            return False
        return self.max_correlation(window) >= self.threshold

    def max_correlation(self, window: np.ndarray) -> float:
        """Highest normalised cross-correlation of ``window`` with any stretch of the recent output."""
        window = window.astype(np.float64)
        window_energy = float(window @ window)
        if window_energy < 1e-8:
            return 0.0
        reference = self._history.astype(np.float64)
        size = 1 << int(np.ceil(np.log2(len(reference) + len(window))))
        products = np.fft.irfft(np.fft.rfft(reference, size) * np.conj(np.fft.rfft(window, size)), size)
        lags = len(reference) - len(window) + 1
        dots = products[:lags]
        energy = np.concatenate([[0.0], np.cumsum(reference**2)])
        stretch_energy = energy[len(window) : len(window) + lags] - energy[:lags]
        valid = stretch_energy > 1e-8
        if not np.any(valid):
            return 0.0
        correlation = np.abs(dots[valid]) / np.sqrt(stretch_energy[valid] * window_energy)
        return float(correlation.max())

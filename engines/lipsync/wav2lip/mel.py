"""Wav2Lip's audio front end in numpy: the mel spectrogram its generator was trained on.

Reference semantics (Wav2Lip's audio.py + hparams.py with librosa 0.7): 16 kHz mono, pre-emphasis 0.97,
STFT n_fft 800 / hop 200 / periodic Hann 800 with centred reflect padding, magnitude -> 80 Slaney mel
bands (55..7600 Hz, Slaney area normalisation), 20*log10(max(1e-5, x)) - 20 dB, then a symmetric
normalisation clipped to [-4, 4]. 80 mel frames per second; mel frame t is centred on sample 200*t.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS_VALUE = 4.0
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // HOP  # 80
MEL_WINDOW = 16  # mel frames per generator input

_PAD = N_FFT // 2

# Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(hz >= _MIN_LOG_HZ, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    linear = _F_SP * mel
    log = _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, linear)


def slaney_mel_filters() -> np.ndarray:
    """(80, 401) triangular filters, equally spaced on the Slaney mel scale, each of unit area in Hz."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(np.array(FMIN)), _hz_to_mel(np.array(FMAX)), N_MELS + 2))
    widths = np.diff(edges_hz)
    offsets = edges_hz[:, None] - fft_hz[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return triangles * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]


_MEL_FILTERS = slaney_mel_filters()
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann


def _preemphasis(wav: np.ndarray, previous_sample: float = 0.0) -> np.ndarray:
    """y[n] = x[n] - 0.97 x[n-1], with x[-1] = previous_sample (0 at the start of the signal)."""
    x = wav.astype(np.float64)
    shifted = np.concatenate(([previous_sample], x[:-1]))[: len(x)]
    return x - PREEMPHASIS * shifted


def _no_frames() -> np.ndarray:
    return np.zeros((N_MELS, 0), dtype=np.float32)


def _frames_to_mel(padded: np.ndarray, count: int) -> np.ndarray:
    """Normalised mel of the ``count`` frames starting every HOP samples at the start of ``padded``."""
    if count <= 0:
        return _no_frames()
    frames = np.lib.stride_tricks.sliding_window_view(padded[: (count - 1) * HOP + N_FFT], N_FFT)[::HOP]
    magnitude = np.abs(np.fft.rfft(frames * _WINDOW, axis=1))
    mel = _MEL_FILTERS @ magnitude.T
    db = 20.0 * np.log10(np.maximum(10 ** (MIN_LEVEL_DB / 20), mel)) - REF_LEVEL_DB
    normalised = 2 * MAX_ABS_VALUE * (db - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS_VALUE
    return np.clip(normalised, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32)


def _mel_of_emphasized(y: np.ndarray) -> np.ndarray:
    if len(y) == 0:
        return _no_frames()
    return _frames_to_mel(np.pad(y, _PAD, mode="reflect"), 1 + len(y) // HOP)


def melspectrogram(wav_16k: np.ndarray) -> np.ndarray:
    """(80, 1 + len(wav) // 200) float32 normalised mel spectrogram of 16 kHz mono audio."""
    return _mel_of_emphasized(_preemphasis(np.asarray(wav_16k).reshape(-1)))


def mel_window_start(frame_index: int, fps: int = 25) -> int:
    """First mel frame of the 16-frame window that video frame ``frame_index`` is generated from."""
    return int(MEL_FRAMES_PER_SECOND * frame_index / fps)


class StreamingMel:
    """Incremental ``melspectrogram``: push audio chunks of any size, get each mel frame once it is final.

    Mel frame t reads samples [200t - 400, 200t + 400); it is emitted as soon as sample 200t + 399 has
    arrived (frame 0 also needs sample 400, for its reflect padding). Until ``finish()`` the frames
    whose window reaches past the audio received are held back: with N >= 401 samples received that is
    exactly 2 frames (``1 + N // 200`` offline frames, ``(N - 400) // 200 + 1`` emitted); with
    fewer than 401 samples, all of them. ``finish()`` applies the end-of-signal reflect padding and returns
    the rest, so the concatenation of everything returned equals ``melspectrogram`` of the whole audio.
    """

    def __init__(self) -> None:
        self._samples = 0  # audio samples received
        self._last_sample = 0.0  # for pre-emphasis across chunks
        self._emitted = 0  # mel frames returned so far
        # Pre-emphasised signal with the start reflect padding, from padded index HOP * _emitted on;
        # before the padding can be built (fewer than 401 samples), the raw pre-emphasised signal.
        self._buffer = np.zeros(0)
        self._padded = False
        self._finished = False

    @property
    def samples_received(self) -> int:
        return self._samples

    @property
    def frames_emitted(self) -> int:
        return self._emitted

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Add audio; returns the (80, k) mel frames it completed (k may be 0)."""
        if self._finished:
            raise RuntimeError("StreamingMel.push() after finish()")
        x = np.asarray(chunk).reshape(-1)
        if len(x) == 0:
            return _no_frames()
        self._buffer = np.concatenate((self._buffer, _preemphasis(x, self._last_sample)))
        self._last_sample = float(x[-1])
        self._samples += len(x)
        if not self._padded:
            if self._samples <= _PAD:
                return _no_frames()
            self._buffer = np.concatenate((self._buffer[_PAD:0:-1], self._buffer))
            self._padded = True
        return self._emit((self._samples - _PAD) // HOP + 1 - self._emitted)

    def finish(self) -> np.ndarray:
        """End of audio: returns the held-back frames. The stream accepts no more audio afterwards."""
        if self._finished:
            raise RuntimeError("StreamingMel.finish() called twice")
        self._finished = True
        if not self._padded:
            return _mel_of_emphasized(self._buffer)
        tail = self._buffer[-2 : -_PAD - 2 : -1]  # end reflect padding: samples N-2 down to N-401
        self._buffer = np.concatenate((self._buffer, tail))
        return self._emit(1 + self._samples // HOP - self._emitted)

    def _emit(self, count: int) -> np.ndarray:
        mel = _frames_to_mel(self._buffer, count)
        self._emitted += count
        self._buffer = self._buffer[count * HOP :]
        return mel

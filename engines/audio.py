"""Audio helpers every stage shares: sample-rate conversion (libswresample, through PyAV), 16-bit PCM and WAV
files, and where speech starts in a clip."""

from __future__ import annotations

import io
import wave

import av
import numpy as np


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample a whole float32 mono clip; the resampler is flushed, so no tail is lost."""
    if source_rate == target_rate or len(audio) == 0:
        return audio.astype(np.float32, copy=False)
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(audio, dtype=np.float32)[None, :], format="flt", layout="mono"
    )
    frame.sample_rate = source_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    parts = [out.to_ndarray()[0] for out in resampler.resample(frame)]
    parts += [out.to_ndarray()[0] for out in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] as 16-bit little-endian PCM."""
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def wav_file(samples: np.ndarray, rate: int) -> bytes:
    """``samples`` (float32 mono in [-1, 1]) as a 16-bit mono WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(pcm16(samples))
    return buffer.getvalue()


ONSET_FRAME_S = 0.005
ONSET_RMS = 10 ** (-50 / 20)  # -50 dBFS: well below speech, well above a voice model's silence
ONSET_LEAD_S = 0.01  # kept before the first sound, so its attack is not cut


def silence_before_onset(audio: np.ndarray, rate: int) -> int:
    """Samples of near-silence before the first sound (less ``ONSET_LEAD_S``); 0 for a clip with no sound."""
    frame = max(1, int(rate * ONSET_FRAME_S))
    frames = len(audio) // frame
    if frames == 0:
        return 0
    rms = np.sqrt(np.mean(np.square(audio[: frames * frame].reshape(frames, frame), dtype=np.float64), axis=1))
    loud = np.flatnonzero(rms > ONSET_RMS)
    if len(loud) == 0:
        return 0
    return max(0, int(loud[0]) * frame - int(rate * ONSET_LEAD_S))

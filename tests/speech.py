"""Speech made at test time with Debian's espeak-ng: nothing recorded is committed."""

from __future__ import annotations

import io
import subprocess
import wave

import numpy as np


def espeak(text: str, voice: str = "en-us", words_per_minute: int = 160) -> tuple[np.ndarray, int]:
    """``text`` spoken by espeak-ng as float32 mono, with its sample rate (22050 Hz)."""
    wav_bytes = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(wav_bytes)) as reader:
        rate = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0, rate


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Linear-interpolation resampling, good enough for feeding test speech to a model."""
    if source_rate == target_rate:
        return audio.astype(np.float32)
    duration = len(audio) / source_rate
    target_times = np.arange(int(duration * target_rate)) / target_rate
    return np.interp(target_times, np.arange(len(audio)) / source_rate, audio).astype(np.float32)

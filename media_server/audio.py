"""Sample-rate conversion with libswresample (through PyAV)."""

from __future__ import annotations

import av
import numpy as np


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample a whole float32 mono clip; the resampler is flushed, so no tail is lost."""
    if source_rate == target_rate or len(audio) == 0:
        return audio.astype(np.float32, copy=False)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, dtype=np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate = source_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    parts = [out.to_ndarray()[0] for out in resampler.resample(frame)]
    parts += [out.to_ndarray()[0] for out in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


class MicrophoneResampler:
    """Decoded WebRTC audio frames (any rate and layout) to a 16 kHz mono float32 stream."""

    def __init__(self, target_rate: int = 16000) -> None:
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)

    def convert(self, frame: av.AudioFrame) -> np.ndarray:
        parts = [out.to_ndarray()[0] for out in self._resampler.resample(frame)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

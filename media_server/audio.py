"""Sample-rate conversion with libswresample (through PyAV), when received audio was captured, and where
speech starts in a clip."""

from __future__ import annotations

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


RTP_TIMESTAMP_WRAP = 1 << 32
# How fast the estimated offset may rise, in seconds a second: a sender's audio clock running up to
# 100 ppm slower than ours is followed, and a backlog of late audio barely moves it.
CLOCK_DRIFT = 1e-4


class CaptureClock:
    """When a received stream's frames were captured, on this machine's clock, from their timestamps.

    Audio can reach us late (the network, a jitter buffer, a busy event loop) but never early, so the
    smallest (arrival - media time) seen is the stream's offset: the capture time of a frame is its
    media time plus that offset, however late the frame itself is handled.
    """

    def __init__(self) -> None:
        self._origin: int | None = None
        self._offset: float | None = None
        self._offset_at = 0.0

    def captured_at(self, frame: av.AudioFrame, arrival: float) -> float:
        """When the frame's first sample was captured (``arrival`` for a frame without a timestamp)."""
        if frame.pts is None or frame.time_base is None:
            return arrival
        if self._origin is None:
            self._origin = frame.pts
        media_s = float(((frame.pts - self._origin) % RTP_TIMESTAMP_WRAP) * frame.time_base)
        offset = arrival - media_s
        if self._offset is not None:
            offset = min(offset, self._offset + CLOCK_DRIFT * (arrival - self._offset_at))
        self._offset, self._offset_at = offset, arrival
        return media_s + offset


class MicrophoneResampler:
    """Decoded WebRTC audio frames (any rate and layout) to a 16 kHz mono float32 stream."""

    def __init__(self, target_rate: int = 16000) -> None:
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)

    def convert(self, frame: av.AudioFrame) -> np.ndarray:
        parts = [out.to_ndarray()[0] for out in self._resampler.resample(frame)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


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

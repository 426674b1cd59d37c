"""Where a microphone frame enters: decoded WebRTC audio to 16 kHz mono windows for the VAD, each with
when it was captured."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

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


async def microphone_windows(
    track: MediaStreamTrack, rate: int, window: int, on_frame: Callable[[float], None]
) -> AsyncIterator[tuple[np.ndarray, float]]:
    """The track's audio as windows of ``window`` float32 samples at ``rate``, each with when its last sample
    was captured (this machine's clock). ``on_frame(arrival)`` hears of every frame received. Ends when
    the track does."""
    converter = MicrophoneResampler(rate)
    capture_clock = CaptureClock()
    pending = np.zeros(0, np.float32)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        arrival = time.monotonic()
        on_frame(arrival)
        captured_until = capture_clock.captured_at(frame, arrival) + frame.samples / frame.sample_rate
        pending = np.concatenate([pending, converter.convert(frame)])
        while len(pending) >= window:
            yield pending[:window], captured_until - (len(pending) - window) / rate
            pending = pending[window:]

"""RTMP push: a broadcast session's ticks, encoded as H.264 + AAC in FLV, sent to a streaming service.

The pusher takes each output tick (one picture and 1/fps s of audio) from the session's timeline,
so sound and picture are stamped from the same clock, and does all encoding and network I/O in its
own thread. A dropped connection is retried with back-off until the pusher is stopped.
"""

from __future__ import annotations

import fractions
import logging
import queue
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import av
import numpy as np

from media_server.config import BroadcastSettings

log = logging.getLogger(__name__)
MAX_QUEUED_TICKS = 50  # 2 s at 25 fps: more means the encoder or the network cannot keep up
OPEN_TIMEOUT_S = 10.0
RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
AAC_FRAME_SAMPLES = 1024


@dataclass
class Tick:
    picture: np.ndarray | None  # None: the picture did not change since the previous tick
    audio: np.ndarray  # float32 mono, sample_rate / fps samples


def redacted(url: str) -> str:
    """The URL without its path: an RTMP path usually ends with the stream key, which is a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…"


class RtmpPusher:
    def __init__(self, url: str, settings: BroadcastSettings, fps: int, sample_rate: int) -> None:
        self.url = url
        self.settings = settings
        self.fps = fps
        self.sample_rate = sample_rate
        self.status = "connecting"  # connecting | live | retrying | stopped
        self.last_error: str | None = None
        self.connections = 0
        self.ticks_sent = 0
        self.ticks_dropped = 0
        self._ticks: queue.Queue[Tick] = queue.Queue(MAX_QUEUED_TICKS)
        self._stopped = threading.Event()
        self._last_picture: np.ndarray | None = None
        self._thread = threading.Thread(target=self._run, name="rtmp-push", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def push(self, picture: np.ndarray | None, audio: np.ndarray) -> None:
        """Called on the event loop for every tick; never blocks it."""
        try:
            self._ticks.put_nowait(Tick(picture, audio))
        except queue.Full:
            self.ticks_dropped += 1

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop pushing and wait, up to ``timeout_s``, for the stream to be closed (blocking: run it in a thread)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def describe(self) -> dict[str, object]:
        return {
            "url": redacted(self.url),
            "status": self.status,
            "last_error": self.last_error,
            "connections": self.connections,
            "ticks_sent": self.ticks_sent,
            "ticks_dropped": self.ticks_dropped,
        }

    # --- the pusher's thread ---------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                self._stream_once()
            except (av.FFmpegError, OSError) as error:
                self.last_error = str(error).replace(self.url, redacted(self.url))  # FFmpeg's messages hold the URL
                log.warning("RTMP push to %s failed: %s", redacted(self.url), self.last_error)
            if self._stopped.is_set():
                break
            # A connection that held for a while starts the back-off again from its shortest delay.
            failures = 1 if time.monotonic() - started > RETRY_DELAYS_S[-1] else failures + 1
            self.status = "retrying"
            self._stopped.wait(RETRY_DELAYS_S[min(failures, len(RETRY_DELAYS_S)) - 1])
            self._discard_queued()
        self.status = "stopped"

    def _discard_queued(self) -> None:
        """Ticks that piled up while disconnected are stale: the stream resumes from now."""
        while True:
            try:
                self._ticks.get_nowait()
            except queue.Empty:
                return

    def _next_picture(self, tick: Tick) -> np.ndarray:
        if tick.picture is not None:
            self._last_picture = tick.picture
        return self._last_picture

    def _next_tick(self) -> Tick | None:
        """The next tick, or None once stop() was called."""
        while not self._stopped.is_set():
            try:
                return self._ticks.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    def _first_tick(self) -> Tick | None:
        """The first tick that has a picture to show: its size is the stream's."""
        while (tick := self._next_tick()) is not None:
            if tick.picture is not None or self._last_picture is not None:
                return tick
        return None

    def _stream_once(self) -> None:
        tick = self._first_tick()
        if tick is None:
            return
        height, width = self._next_picture(tick).shape[:2]
        self.status = "connecting"
        container = av.open(
            self.url, mode="w", format="flv", options={"flvflags": "no_duration_filesize"}, timeout=OPEN_TIMEOUT_S
        )
        try:
            self.connections += 1
            video, audio = self._add_streams(container, width, height)
            resampler = av.AudioResampler(
                format="fltp", layout="stereo", rate=self.sample_rate, frame_size=AAC_FRAME_SAMPLES
            )
            index = 0
            while tick is not None:
                self._encode_tick(container, video, audio, resampler, tick, index)
                if index == 0:
                    self.status = "live"
                    self.last_error = None
                index += 1
                self.ticks_sent += 1
                tick = self._next_tick()
            for packet in video.encode():
                container.mux(packet)
        finally:
            container.close()

    def _add_streams(
        self, container: av.container.OutputContainer, width: int, height: int
    ) -> tuple[av.VideoStream, av.AudioStream]:
        video = container.add_stream("libx264", rate=self.fps, options={"preset": "veryfast", "tune": "zerolatency"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.bit_rate = self.settings.rtmp_video_kbps * 1000
        video.codec_context.gop_size = max(1, round(self.settings.rtmp_keyframe_s * self.fps))
        audio = container.add_stream("aac", rate=self.sample_rate, layout="stereo")
        audio.bit_rate = self.settings.rtmp_audio_kbps * 1000
        return video, audio

    def _encode_tick(
        self,
        container: av.container.OutputContainer,
        video: av.VideoStream,
        audio: av.AudioStream,
        resampler: av.AudioResampler,
        tick: Tick,
        index: int,
    ) -> None:
        # Every tick gets a picture (the last one again while idle video skips ticks): services expect a constant rate.
        frame = av.VideoFrame.from_ndarray(self._next_picture(tick), format="bgr24")
        frame.pts = index
        frame.time_base = fractions.Fraction(1, self.fps)
        for packet in video.encode(frame):
            container.mux(packet)
        sound = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(tick.audio, np.float32)[None, :], format="flt", layout="mono"
        )
        sound.sample_rate = self.sample_rate
        sound.pts = index * len(tick.audio)
        sound.time_base = fractions.Fraction(1, self.sample_rate)
        for chunk in resampler.resample(sound):
            for packet in audio.encode(chunk):
                container.mux(packet)

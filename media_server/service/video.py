"""MP4s of the avatar speaking: speech pushed in, rendered by a lip-sync stream and encoded as it comes.

Frame k is video pts k and carries audio samples [k*spf, (k+1)*spf) of the speech (spf = rate / fps), so
the two tracks cannot drift. The file is written under a temporary name beside its final one and renamed
once complete, so no reader ever sees half an MP4.
"""

from __future__ import annotations

import contextlib
import fractions
import os
from pathlib import Path

import av
import numpy as np

from engines.avatar import Avatar
from engines.base import AVFrame, LipSyncEngine

VIDEO_CODEC, AUDIO_CODEC = "libx264", "aac"
VIDEO_OPTIONS = {"crf": "20", "preset": "veryfast"}
AUDIO_BIT_RATE = 128_000


class SpeechVideo:
    """One MP4 being written. Blocking, and for one thread at a time (the lip-sync stream is not thread-safe)."""

    def __init__(self, lipsync: LipSyncEngine, avatar: Avatar, path: Path, fps: int, sample_rate: int) -> None:
        self.path = path
        self.sample_rate = sample_rate
        self.frames = 0
        self._samples = 0
        self._stream = lipsync.open_stream(avatar, fps, sample_rate)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.mp4")
        self._container = av.open(str(self._partial), "w", format="mp4")
        self._video = self._container.add_stream(VIDEO_CODEC, rate=fps, options=VIDEO_OPTIONS)
        self._video.width, self._video.height = avatar.size
        self._video.pix_fmt = "yuv420p"
        self._video.time_base = fractions.Fraction(1, fps)
        self._audio = self._container.add_stream(AUDIO_CODEC, rate=sample_rate, layout="mono")
        self._audio.bit_rate = AUDIO_BIT_RATE

    def push(self, audio: np.ndarray) -> int:
        """Speech (float32 mono at ``sample_rate``) to render next; the frames it already allows are written.
        Returns how many were."""
        self._stream.push_audio(audio)
        return self._write(self._stream.pull())

    def finish(self) -> int:
        """Render and write the rest, close the file and give it its name. Returns the frames written last."""
        self._stream.end_segment()
        written = self._write(self._stream.pull())
        self._container.mux(self._video.encode(None))
        self._container.mux(self._audio.encode(None))
        self._container.close()
        os.replace(self._partial, self.path)
        return written

    def abandon(self) -> None:
        """Stop without a file: nothing is left on disk."""
        with contextlib.suppress(av.error.FFmpegError):
            self._container.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._partial)

    def _write(self, frames: list[AVFrame]) -> int:
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame.video, format="bgr24")
            picture.pts = self.frames
            self._container.mux(self._video.encode(picture))
            sound = av.AudioFrame.from_ndarray(frame.audio[None, :].astype(np.float32), format="flt", layout="mono")
            sound.sample_rate = self.sample_rate
            sound.pts = self._samples
            sound.time_base = fractions.Fraction(1, self.sample_rate)
            self._container.mux(self._audio.encode(sound))
            self.frames += 1
            self._samples += len(frame.audio)
        return len(frames)

"""Audio in and out of the model APIs: base64 checked, any container PyAV decodes read as float32 mono at
the rate a model wants (within ``api.max_audio_s``), and float32 speech resampled as it streams."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import av
import numpy as np

from engines.audio import resample
from engines.base import VADEngine
from media_server.service.errors import BadInput

# How much of the input FFmpeg may read to find its format and streams.
PROBE_BYTES = 4 * 1024 * 1024


def decoded_base64(text: object, field: str) -> bytes:
    """The bytes a base64 field holds; BadInput saying what is wrong otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f'"{field}" must be a non-empty base64 string')
    payload = text.strip()
    if payload.startswith("data:") and "," in payload:  # a data: URL, as browsers make them
        payload = payload.split(",", 1)[1]
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f'"{field}" is not valid base64') from None


def read_audio(
    source: bytes | Path, sample_rate: int, max_seconds: float | None = None, what: str = "the audio"
) -> np.ndarray:
    """Any audio FFmpeg can decode (a WAV of any rate and channel count, MP3, Ogg, ...), as float32 mono at
    ``sample_rate``; BadInput saying why it cannot be, or when it is longer than ``max_seconds``."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    limit = None if max_seconds is None else int(max_seconds * sample_rate)
    parts: list[np.ndarray] = []
    samples = 0
    opened = str(source) if isinstance(source, Path) else io.BytesIO(source)
    try:
        with av.open(opened, options={"probesize": str(PROBE_BYTES)}) as container:
            if not container.streams.audio:
                raise BadInput(f"{what} holds no audio stream")
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    samples += len(parts[-1])
                if limit is not None and samples > limit:
                    raise BadInput(f"{what} is longer than {max_seconds:g} s, the limit (api.max_audio_s)")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as error:
        detail = getattr(error, "strerror", None) or str(error)
        raise BadInput(f"{what} could not be read as audio ({detail}): send a WAV, MP3, Ogg or FLAC file") from None
    parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    audio = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if not audio.size:
        raise BadInput(f"{what} holds no audio samples")
    return audio


class StreamResampler:
    """float32 mono pieces of one stream at ``source_rate`` to ``target_rate``, without a seam between pieces."""

    def __init__(self, source_rate: int, target_rate: int) -> None:
        self.source_rate = source_rate
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
        self._pts = 0

    def push(self, audio: np.ndarray) -> np.ndarray:
        samples = np.ascontiguousarray(audio, dtype=np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = self.source_rate
        frame.pts = self._pts
        self._pts += len(audio)
        return self._joined(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        return self._joined(self._resampler.resample(None))

    @staticmethod
    def _joined(frames: list[av.AudioFrame]) -> np.ndarray:
        parts = [frame.to_ndarray().reshape(-1) for frame in frames]
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def speech_heard(vad: VADEngine, audio: np.ndarray, rate: int, threshold: float, min_speech_ms: int) -> bool:
    """Whether the VAD hears at least ``min_speech_ms`` of speech in ``audio``: Whisper given only silence
    or noise writes words that were never said."""
    samples = resample(audio, rate, vad.sample_rate)
    stream, window = vad.open_stream(), vad.window_samples
    needed = max(1, round(min_speech_ms / 1000 * vad.sample_rate / window))
    voiced = 0
    for start in range(0, len(samples) - window + 1, window):
        voiced += stream.speech_probability(samples[start : start + window]) > threshold
        if voiced >= needed:
            return True
    return False

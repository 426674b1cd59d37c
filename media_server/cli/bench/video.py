"""``facecast bench video``: the session's VP8 encoder (RenderedVideoVp8Encoder) against aiortc's own.

Both encode the same frames: the default avatar speaking a few sentences (the configured lip-sync
engine, the project's voice) and then idling. The two encoders take turns, a whole pass each, for
several rounds, so a change in machine load hits both alike. Per encoder: the median time to encode a
frame (the conversion to yuv420p included, as the timeline does it), the mean PSNR of the frames as a
receiver decodes them, and the bitrate.
"""

from __future__ import annotations

import argparse
import fractions
import statistics
import time

import av
import numpy as np
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload

from engines.audio import resample
from engines.avatar import Avatar, load_avatar
from engines.base import LipSyncEngine, TTSEngine
from engines.registry import create_engine
from media_server.cli.bench.output import print_summary
from media_server.config import MediaSettings, Settings
from media_server.media.tracks import picture_frame
from media_server.media.webrtc import RenderedVideoVp8Encoder

ENCODERS: dict[str, type[Vp8Encoder]] = {"rendered": RenderedVideoVp8Encoder, "aiortc": Vp8Encoder}
SPEECH = (
    "Jupiter is the largest planet in our solar system. It has dozens of moons, "
    "and a great red spot that is a storm larger than the Earth."
)
IDLE_FRAMES = 50
ROUNDS = 3


def avatar_frames(tts: TTSEngine, lipsync: LipSyncEngine, avatar: Avatar, media: MediaSettings) -> list[np.ndarray]:
    """BGR frames of ``avatar`` saying SPEECH, then idling."""
    chunks = list(tts.synthesize(SPEECH, tts.default_voice))
    audio = np.concatenate([resample(c.audio, c.sample_rate, media.sample_rate) for c in chunks])
    lipsync.prepare(avatar)
    stream = lipsync.open_stream(avatar, media.fps, media.sample_rate)
    stream.push_audio(audio)
    stream.end_segment()
    frames = [frame.video for frame in stream.pull()]
    return frames + [stream.idle_frame() for _ in range(IDLE_FRAMES)]


def encode_frames(encoder: Vp8Encoder, frames: list[np.ndarray], fps: int) -> tuple[list[float], list[bytes]]:
    """(seconds per frame, each encoded frame as a receiver reassembles it from its RTP payloads)."""
    seconds, encoded = [], []
    for index, picture in enumerate(frames):
        frame = picture_frame(picture)
        frame.pts, frame.time_base = index, fractions.Fraction(1, fps)
        started = time.perf_counter()
        payloads, _ = encoder.encode(frame)
        seconds.append(time.perf_counter() - started)
        encoded.append(b"".join(vp8_depayload(payload) for payload in payloads))
    return seconds, encoded


def mean_psnr(frames: list[np.ndarray], encoded: list[bytes]) -> float:
    decoder = av.CodecContext.create("libvpx", "r")
    scores = []
    for picture, data in zip(frames, encoded, strict=True):
        for decoded in decoder.decode(av.Packet(data)):
            error = np.mean((decoded.to_ndarray(format="bgr24").astype(np.float64) - picture) ** 2)
            scores.append(10 * np.log10(255**2 / max(error, 1e-10)))
    return float(np.mean(scores))


def run(settings: Settings) -> dict[str, object]:
    avatar = load_avatar(settings.server.avatars_dir / settings.server.default_avatar)
    lipsync = create_engine("lipsync", settings.lipsync.engine, settings.lipsync.options)
    tts = create_engine("tts", settings.tts.engine, settings.tts.options)
    try:
        frames = avatar_frames(tts, lipsync, avatar, settings.media)
    finally:
        tts.close()
        lipsync.close()
    fps = settings.media.fps
    timings: dict[str, list[float]] = {name: [] for name in ENCODERS}
    quality: dict[str, float] = {}
    kilobits: dict[str, float] = {}
    for round_number in range(ROUNDS):
        order = list(ENCODERS.items())[round_number % 2 :] + list(ENCODERS.items())[: round_number % 2]
        for name, encoder_class in order:
            seconds, encoded = encode_frames(encoder_class(), frames, fps)
            timings[name] += seconds
            quality[name] = mean_psnr(frames, encoded)  # the same every round: encoding is deterministic
            kilobits[name] = 8 * sum(map(len, encoded)) / len(frames) * fps / 1000
    per_frame = {name: statistics.median(values) * 1000 for name, values in timings.items()}
    height, width = frames[0].shape[:2]
    return {
        "frames": len(frames),
        "size": f"{width}x{height}",
        "encode_ms_per_frame_p50": {name: round(ms, 2) for name, ms in per_frame.items()},
        "rendered_over_aiortc": round(per_frame["rendered"] / per_frame["aiortc"], 2),
        "psnr_db": {name: round(db, 2) for name, db in quality.items()},
        "kbps": {name: round(rate) for name, rate in kilobits.items()},
    }


def main(args: argparse.Namespace, settings: Settings) -> None:
    print_summary(run(settings), args.json)

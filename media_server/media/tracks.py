"""What the avatar's output hands to WebRTC: Opus packets encoded on the clock, and tracks that only forward.

The audio is Opus-encoded on the output clock, and the WebRTC sender only packs it. Left to aiortc,
each 20 ms packet would make a round trip through a worker thread to be encoded; on a busy machine
those round trips fall behind the clock, and the avatar's voice queues up, late and behind its own
video. Encoding once here also serves every broadcast viewer.
"""

from __future__ import annotations

import asyncio
import fractions
from collections.abc import Callable

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

MAX_TRACK_BACKLOG = 50
OPUS_BITRATE = 48000  # mono speech; Opus is transparent for voice well below this


class OpusEncoder:
    """Packets of ``packet_s`` of mono 16-bit audio to Opus packets, each carrying the int16 samples it
    encodes (``packet.opaque``) for whoever needs to know what was sent.

    An idle avatar sends silence all the time. A few packets into a silence libopus writes the same
    bytes for every silent packet; from then on those bytes are sent again without calling the encoder.
    The encoder's state then stays that of a shorter silence: speech after it is encoded a little
    differently, not worse (within 0.5 dB SNR, tests/test_av_output.py).
    """

    def __init__(self, sample_rate: int, packet_s: float = 0.02) -> None:
        self.codec = av.CodecContext.create("libopus", "w")
        self.codec.sample_rate = sample_rate
        self.codec.layout = "mono"
        self.codec.format = "s16"
        self.codec.bit_rate = OPUS_BITRATE
        self.codec.options = {"application": "voip", "frame_duration": f"{packet_s * 1000:g}"}
        self.codec.time_base = fractions.Fraction(1, sample_rate)
        self._last_silent_payload: bytes | None = None
        self._steady_silence: bytes | None = None
        # Packets are stamped this much before their input (the encoder's lookahead), by us: the encoder
        # counts the samples it was given and would not see the silence it was spared.
        self._output_delay: int | None = None
        self.encoder_calls = 0

    def encode(self, pcm: np.ndarray, pts: int) -> list[av.Packet]:
        if pcm.any():
            self._last_silent_payload = self._steady_silence = None
            return self._encode(pcm, pts)
        if self._steady_silence is not None:
            return [self._packet(self._steady_silence, pcm, pts)]
        packets = self._encode(pcm, pts)
        if len(packets) == 1:
            payload = bytes(packets[0])
            if payload == self._last_silent_payload:
                self._steady_silence = payload
            self._last_silent_payload = payload
        return packets

    def _encode(self, pcm: np.ndarray, pts: int) -> list[av.Packet]:
        self.encoder_calls += 1
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = self.codec.sample_rate
        frame.pts = pts
        frame.time_base = self.codec.time_base
        packets = self.codec.encode(frame)
        if packets and self._output_delay is None:
            self._output_delay = pts - packets[0].pts
        for packet in packets:
            packet.pts = pts - (self._output_delay or 0)
            packet.opaque = pcm
        return packets

    def _packet(self, payload: bytes, pcm: np.ndarray, pts: int) -> av.Packet:
        packet = av.Packet(payload)
        packet.pts = pts - (self._output_delay or 0)
        packet.time_base = self.codec.time_base
        packet.opaque = pcm
        return packet


def picture_frame(picture: np.ndarray) -> av.VideoFrame:
    """A BGR picture (even width and height) in the encoders' own format, yuv420p: OpenCV converts it in
    a fraction of the time the encoders' own conversion takes (BT.601, limited range, as theirs)."""
    return av.VideoFrame.from_ndarray(cv2.cvtColor(picture, cv2.COLOR_BGR2YUV_I420), format="yuv420p")


class OutputTrack(MediaStreamTrack):
    """A track that returns what the timeline gives it; the timeline does the pacing."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._frames: asyncio.Queue[av.Packet | av.VideoFrame] = asyncio.Queue()
        self.dropped = 0
        # Called with each packet or frame as its consumer (the WebRTC sender) takes it: when it
        # leaves, which is later than when it was offered whenever the consumer falls behind.
        self.taken_listeners: list[Callable[[av.Packet | av.VideoFrame], None]] = []

    def offer(self, frame: av.Packet | av.VideoFrame) -> None:
        if self._frames.qsize() >= MAX_TRACK_BACKLOG:  # the consumer stalled: keep the newest
            self._frames.get_nowait()
            self.dropped += 1
        self._frames.put_nowait(frame)

    async def recv(self) -> av.Packet | av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._frames.get()
        for listener in self.taken_listeners:
            listener(frame)
        return frame

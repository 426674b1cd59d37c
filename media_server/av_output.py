"""The session's output timeline: audio is the clock.

One paced loop advances a tick every 1/fps seconds. Each tick takes exactly one AVFrame (a
speech frame from the queue, or an idle frame and silence) and hands its audio, split into
20 ms packets, to the audio track and its picture to the video track, both stamped with the
same tick. The two tracks are fed from the same queue at the same time, so they cannot drift
apart however long the session runs.

The audio is Opus-encoded here, on the clock, and the WebRTC sender only packs it. Left to aiortc,
each 20 ms packet would make a round trip through a worker thread to be encoded; on a busy machine
those round trips fall behind the clock, and the avatar's voice queues up, late and behind its own
video (up to 0.8 s in a test under load). Encoding once here also serves every broadcast viewer.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engines.base import AVFrame, LipSyncStream

AUDIO_PACKET_S = 0.02
VIDEO_CLOCK_RATE = 90000
MAX_TRACK_BACKLOG = 50
OPUS_BITRATE = 48000  # mono speech; Opus is transparent for voice well below this


@dataclass
class QueuedFrame:
    frame: AVFrame
    turn: int
    first_of_turn: bool = False
    last_of_turn: bool = False


@dataclass
class PlaybackEvent:
    kind: str  # "started" | "finished"
    turn: int
    at: float  # time.monotonic() when the tick's audio was handed to the audio track
    longest_gap_s: float = 0.0  # with "finished": the longest stretch the pipeline left playback waiting


class OpusEncoder:
    """20 ms packets of mono 16-bit audio to Opus packets, each carrying the int16 samples it encodes
    (``packet.opaque``) for whoever needs to know what was sent.

    An idle avatar sends silence 50 times a second. A few packets into a silence libopus writes the same
    bytes for every silent packet; from then on those bytes are sent again without calling the encoder.
    The encoder's state then stays that of a shorter silence: speech after it is encoded a little
    differently, not worse (within 0.5 dB SNR, tests/test_av_output.py).
    """

    def __init__(self, sample_rate: int) -> None:
        self.codec = av.CodecContext.create("libopus", "w")
        self.codec.sample_rate = sample_rate
        self.codec.layout = "mono"
        self.codec.format = "s16"
        self.codec.bit_rate = OPUS_BITRATE
        self.codec.options = {"application": "voip"}
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


class OutputTrack(MediaStreamTrack):
    """A track that returns what the timeline gives it; the timeline does the pacing."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._frames: asyncio.Queue[av.Packet | av.VideoFrame] = asyncio.Queue()
        self.dropped = 0
        # Called with each packet or frame as its consumer (the WebRTC sender) takes it: when it
        # leaves, which is later than when it was offered whenever the consumer falls behind.
        self.on_taken: Callable[[av.Packet | av.VideoFrame], None] = lambda frame: None

    def offer(self, frame: av.Packet | av.VideoFrame) -> None:
        if self._frames.qsize() >= MAX_TRACK_BACKLOG:  # the consumer stalled: keep the newest
            self._frames.get_nowait()
            self.dropped += 1
        self._frames.put_nowait(frame)

    async def recv(self) -> av.Packet | av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._frames.get()
        self.on_taken(frame)
        return frame


class AVTimeline:
    def __init__(
        self,
        lipsync: LipSyncStream,
        lipsync_executor: Executor,
        fps: int,
        sample_rate: int,
        idle_fps: int | None = None,
    ) -> None:
        self.lipsync = lipsync
        self.lipsync_executor = lipsync_executor
        self.fps = fps
        self.sample_rate = sample_rate
        self.samples_per_frame = sample_rate // fps
        self.idle_stride = max(1, round(fps / (idle_fps or fps)))
        self.on_playback: Callable[[PlaybackEvent], None] = lambda event: None
        # Every tick's picture (BGR; None when idle video skipped the tick) and audio (float32 mono), for
        # consumers other than the tracks (RTMP push).
        self.on_frame: Callable[[np.ndarray | None, np.ndarray], None] = lambda picture, audio: None
        self.audio = OutputTrack("audio")
        self.video = OutputTrack("video")
        self.tick = 0
        self.frames_sent = 0
        self.late_ticks = 0
        self._speech: deque[QueuedFrame] = deque()
        self._silence = np.zeros(self.samples_per_frame, dtype=np.float32)
        self._playing_turn: int | None = None
        self.paused = False
        self._gap_ticks = 0
        self._longest_gap_ticks = 0
        self._last_picture_tick = -1
        self._pending_pcm = np.zeros(0, dtype=np.int16)  # audio not yet a whole 20 ms packet
        self._audio_samples_sent = 0
        self._opus = OpusEncoder(sample_rate)

    # --- fed by the pipeline -------------------------------------------------

    def enqueue(self, frames: list[QueuedFrame]) -> None:
        self._speech.extend(frames)

    @property
    def queued_frames(self) -> int:
        return len(self._speech)

    def mark_last(self, turn: int) -> None:
        """The turn has no more frames: its last queued frame ends it, or it ends now if all were played."""
        for queued in reversed(self._speech):
            if queued.turn == turn:
                queued.last_of_turn = True
                return
        if self._playing_turn == turn:
            self._finish(turn, time.monotonic())

    def clear(self) -> None:
        """Barge-in: drop every queued speech frame."""
        self._speech.clear()
        self._playing_turn = None
        self.paused = False

    def pause(self) -> None:
        """Hold speech where it is (idle frames and silence play meanwhile) until resume() or clear()."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    @property
    def speaking(self) -> bool:
        return self._playing_turn is not None

    # --- the clock -------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            delay = start + self.tick / self.fps - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0 / self.fps:
                self.late_ticks += 1
            await self._play_tick(loop)
            self.tick += 1

    async def _play_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        picture: np.ndarray | None
        if self._speech and not self.paused:
            queued = self._speech.popleft()
            picture, audio = queued.frame.video, queued.frame.audio
        else:
            queued, audio = None, self._silence
            # Idle video runs at a lower rate: encoding every frame is most of an idle session's cost.
            picture = None
            if self.tick % self.idle_stride == 0:
                elapsed = self.tick - self._last_picture_tick
                picture = await loop.run_in_executor(self.lipsync_executor, self.lipsync.idle_frame, elapsed)
        self._send(picture, audio)
        self.on_frame(picture, audio)
        if queued is not None:
            self._report(queued)
        elif self._playing_turn is not None and not self.paused:
            self._gap_ticks += 1  # mid-reply, nothing rendered in time: a gap the listener hears
            self._longest_gap_ticks = max(self._longest_gap_ticks, self._gap_ticks)

    def _report(self, queued: QueuedFrame) -> None:
        now = time.monotonic()
        self._gap_ticks = 0
        if queued.first_of_turn or self._playing_turn != queued.turn:
            self._playing_turn = queued.turn
            self._longest_gap_ticks = 0
            self.on_playback(PlaybackEvent("started", queued.turn, now))
        if queued.last_of_turn:
            self._finish(queued.turn, now)

    def _finish(self, turn: int, now: float) -> None:
        self._playing_turn = None
        self.on_playback(PlaybackEvent("finished", turn, now, self._longest_gap_ticks / self.fps))

    def _send(self, picture: np.ndarray | None, audio: np.ndarray) -> None:
        if picture is not None:
            self._last_picture_tick = self.tick
            video_frame = av.VideoFrame.from_ndarray(picture, format="bgr24")
            video_frame.pts = self.tick * VIDEO_CLOCK_RATE // self.fps
            video_frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
            self.video.offer(video_frame)
            self.frames_sent += 1
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
        self._pending_pcm = np.concatenate([self._pending_pcm, pcm])
        packet = int(self.sample_rate * AUDIO_PACKET_S)
        while len(self._pending_pcm) >= packet:
            for encoded in self._opus.encode(self._pending_pcm[:packet], self._audio_samples_sent):
                self.audio.offer(encoded)
            self._pending_pcm = self._pending_pcm[packet:]
            self._audio_samples_sent += packet

    def stop(self) -> None:
        self.audio.stop()
        self.video.stop()

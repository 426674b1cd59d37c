"""The avatar's output: the one owner of its lip-sync stream, that stream's thread, the frame queue and
the clock. Audio is the clock.

Speech comes in as audio (``speak``); the lip-sync stream renders it into AVFrames, each a picture and
exactly the audio shown with it, and they wait in one queue. One paced loop advances a tick every
1/fps seconds. Each tick takes exactly one AVFrame (a speech frame from the queue, or an idle frame
and silence) and hands its audio, as Opus packets, to the audio track and its picture to the
video track, both stamped with the same tick. The two tracks are fed from the same queue at the same
time, so they cannot drift apart however long the session runs.

Idle frames come at the full frame rate too, so a blink is as smooth as speech. A picture that did not
change (the lip-sync stream hands out the previous one again) is not sent: encoding and sending every
frame would be most of an idle session's cost. While the picture stays still it is sent again every
1/idle_fps s, so that players keep a live stream and a keyframe asked for is never long in coming.

A turn's frames play in order; the frame the lip-sync stream marks ``segment_end`` ends the turn.
Speech may come with a caption (its sentence): the frame its first sample is shown with carries it,
and playing that frame reports it (``Playback.SPOKEN``), so a client reads each sentence as it hears it.
A speculative turn's frames are held back (``hold``) until it is confirmed (``reveal``) or dropped
(``discard``); a barge-in drops everything (``clear``).
"""

from __future__ import annotations

import asyncio
import fractions
import itertools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

import numpy as np

from engines.avatar import Avatar
from engines.base import AVFrame, LipSyncEngine, PhonemeTiming
from media_server.config import MediaSettings
from media_server.media.tracks import OpusEncoder, OutputTrack, picture_frame

VIDEO_CLOCK_RATE = 90000
LIPSYNC_PIECE_S = 0.2
IDLE_FRAMES_AHEAD = 5  # idle frames rendered per trip to the stream's thread (each trip costs two thread switches)
# Two frames at 25 fps (one to show, one the renderer looks ahead into), then two more while it plays.
TURN_START_LIPSYNC_PIECES_S = (0.08, 0.08)
# A dropped turn's render still in flight lands within a loop iteration or two of the drop; a few of the
# latest dropped turns are all that need remembering.
DROPPED_TURNS_KEPT = 16


class Playback(Enum):
    RENDERED = "rendered"  # the turn's first frames are rendered and queued (or held)
    STARTED = "started"  # its first frame went out
    SPOKEN = "spoken"  # the first frame of a captioned piece of speech went out (the event carries the caption)
    FINISHED = "finished"  # its last frame went out


@dataclass(frozen=True)
class PlaybackEvent:
    kind: Playback
    turn: int
    at: float  # time.monotonic()
    longest_gap_s: float = 0.0  # with FINISHED: the longest stretch playback waited for the pipeline
    caption: str = ""  # with SPOKEN


@dataclass(frozen=True)
class QueuedFrame:
    frame: AVFrame
    turn: int
    caption: str = ""  # the caption of the speech that starts with this frame


PlaybackListener = Callable[[PlaybackEvent], None]
# Every tick's picture (BGR; None when it did not change since the previous tick) and audio (float32 mono).
FrameListener = Callable[[np.ndarray | None, np.ndarray], None]
# Each packet's audio (int16) as the audio track's consumer takes it, and when.
SentAudioListener = Callable[[np.ndarray, float], None]


def lipsync_pieces(samples: int, rate: int, turn_starts: bool) -> list[tuple[int, int]]:
    """(start, end) of the pieces a chunk's audio is rendered in, so the first frames are queued before
    the whole sentence is rendered. A turn starts with short pieces, so its first frame is queued at once
    and each next piece is rendered before the frames already queued have played."""
    sizes = [int(seconds * rate) for seconds in (TURN_START_LIPSYNC_PIECES_S if turn_starts else ())]
    bounds = [0]
    while bounds[-1] < samples:
        size = sizes.pop(0) if sizes else int(LIPSYNC_PIECE_S * rate)
        bounds.append(min(bounds[-1] + size, samples))
    return list(itertools.pairwise(bounds))


class AvatarOutput:
    def __init__(
        self,
        lipsync: LipSyncEngine,
        avatar: Avatar,
        media: MediaSettings,
        name: str,
        on_late_tick: Callable[[], None] = lambda: None,
    ) -> None:
        # One thread for the stream, so it is only ever touched by one thread at a time, in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lipsync-{name[:6]}")
        self._stream = lipsync.open_stream(avatar, media.fps, media.sample_rate)
        self.fps = media.fps
        self.sample_rate = media.sample_rate
        self.samples_per_frame = media.sample_rate // media.fps
        self.still_stride = max(1, round(media.fps / media.idle_fps))
        self.audio = OutputTrack("audio")
        self.video = OutputTrack("video")
        self._playback_listeners: list[PlaybackListener] = []
        self._frame_listeners: list[FrameListener] = []
        self.tick = 0
        self.frames_sent = 0
        self._on_late_tick = on_late_tick
        self.paused = False
        self._queue: deque[QueuedFrame] = deque()
        self._idle_ahead: deque[np.ndarray] = deque()
        self._idle_rendering: asyncio.Future[list[np.ndarray]] | None = None
        self._held: dict[int, list[QueuedFrame]] = {}
        self._dropped: deque[int] = deque(maxlen=DROPPED_TURNS_KEPT)  # turns whose frames must never play
        self._rendering: tuple[int, bool] | None = None  # (turn, whether its first frames are rendered)
        # The rendering turn's segment: samples pushed, frames queued, and captions waiting for their frame.
        self._segment_samples = 0
        self._segment_frames = 0
        self._captions: deque[tuple[int, str]] = deque()  # (frame index in the segment, caption)
        self._playing_turn: int | None = None
        self._silence = np.zeros(self.samples_per_frame, dtype=np.float32)
        self._gap_ticks = 0
        self._longest_gap_ticks = 0
        self._shown: np.ndarray | None = None  # the picture on screen
        self._video_tick = 0  # when the video track was last given a frame
        self._pending_pcm = np.zeros(0, dtype=np.int16)  # audio not yet a whole packet
        self._audio_samples_sent = 0
        self.audio_packet_s = media.audio_packet_ms / 1000
        self._opus = OpusEncoder(media.sample_rate, self.audio_packet_s)
        self._closed = False

    # --- listeners -------------------------------------------------------------------------

    def add_playback_listener(self, listener: PlaybackListener) -> None:
        self._playback_listeners.append(listener)

    def add_frame_listener(self, listener: FrameListener) -> None:
        self._frame_listeners.append(listener)

    def remove_frame_listener(self, listener: FrameListener) -> None:
        self._frame_listeners.remove(listener)

    def add_sent_audio_listener(self, listener: SentAudioListener) -> None:
        self.audio.taken_listeners.append(lambda packet: listener(packet.opaque, time.monotonic()))

    # --- speech in ---------------------------------------------------------------------------

    async def speak(
        self, turn: int, audio: np.ndarray, phonemes: tuple[PhonemeTiming, ...] | None = None, caption: str = ""
    ) -> None:
        """Render ``audio`` (float32 mono at ``sample_rate``) as the turn's next speech, queueing its frames
        piece by piece so the first of them play before the rest is rendered. A ``caption`` is reported
        when the frame of the audio's first sample plays."""
        if self._rendering is None or self._rendering[0] != turn:
            self._rendering = (turn, False)
            self._segment_samples = self._segment_frames = 0
            self._captions.clear()
        if caption:
            # Frame k of a segment is shown with its samples [k * spf, (k + 1) * spf).
            self._captions.append((self._segment_samples // self.samples_per_frame, caption))
        self._segment_samples += len(audio)
        for start, end in lipsync_pieces(len(audio), self.sample_rate, turn_starts=not self._rendering[1]):
            piece_phonemes = phonemes if start == 0 else None
            frames = await self._in_stream_thread(self._push, audio[start:end], piece_phonemes)
            self._queue_frames(turn, frames)

    async def end_turn(self, turn: int) -> bool:
        """The turn has no more speech: render its tail, whose last frame ends the turn when it plays.
        False when the turn rendered no speech at all (nothing of it will play)."""
        frames = await self._in_stream_thread(self._finish)
        self._queue_frames(turn, frames)
        return self._rendering == (turn, True)

    async def wait_until_ahead_below(self, turn: int, seconds: float) -> None:
        """Return once less than ``seconds`` of speech waits to play (held frames of ``turn`` included)."""
        limit = seconds * self.fps
        while len(self._queue) + len(self._held.get(turn, ())) > limit:
            await asyncio.sleep(1 / self.fps)

    def hold(self, turn: int) -> None:
        """Keep the turn's frames back until ``reveal`` (a speculative reply, not yet confirmed)."""
        self._held.setdefault(turn, [])

    def reveal(self, turn: int) -> None:
        self._queue.extend(self._held.pop(turn, ()))

    def discard(self, turn: int) -> None:
        """Forget a held turn: its frames, and the audio the stream still holds for it."""
        self._held.pop(turn, None)
        self._dropped.append(turn)
        self._clear_stream()

    def clear(self) -> None:
        """Barge-in: drop every queued and held frame, and what the lip-sync stream has not rendered yet.
        A render of these turns that finishes afterwards (its task not yet cancelled) is dropped too."""
        self._dropped.extend(self._known_turns())
        self._queue.clear()
        self._held.clear()
        self._playing_turn = None
        self.paused = False
        self._clear_stream()

    def _known_turns(self) -> set[int]:
        turns = {queued.turn for queued in self._queue} | set(self._held)
        if self._rendering is not None:
            turns.add(self._rendering[0])
        if self._playing_turn is not None:
            turns.add(self._playing_turn)
        return turns

    def _clear_stream(self) -> None:
        """After whatever the stream's thread is rendering now: a render already running is not cut short."""
        if not self._closed:
            self._executor.submit(self._stream.clear)

    def pause(self) -> None:
        """Hold speech where it is (idle frames and silence play meanwhile) until resume() or clear()."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    @property
    def speaking(self) -> bool:
        return self._playing_turn is not None

    def _push(self, audio: np.ndarray, phonemes: tuple[PhonemeTiming, ...] | None) -> list[AVFrame]:
        self._stream.push_audio(audio, phonemes)
        return self._stream.pull()

    def _idle_frames(self) -> list[np.ndarray]:
        return [self._stream.idle_frame() for _ in range(IDLE_FRAMES_AHEAD)]

    def _finish(self) -> list[AVFrame]:
        self._stream.end_segment()
        return self._stream.pull()

    async def _in_stream_thread(self, fn: Callable[..., list[AVFrame]], *args: object) -> list[AVFrame]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _queue_frames(self, turn: int, frames: list[AVFrame]) -> None:
        if not frames or turn in self._dropped:
            return
        queued = [QueuedFrame(frame, turn, self._caption_of_next_frame()) for frame in frames]
        if self._rendering == (turn, False):
            self._rendering = (turn, True)
            self._notify(PlaybackEvent(Playback.RENDERED, turn, time.monotonic()))
        held = self._held.get(turn)
        if held is not None:
            held.extend(queued)
        else:
            self._queue.extend(queued)

    def _caption_of_next_frame(self) -> str:
        """The captions starting at the segment's next frame (joined, should two start on one frame)."""
        captions = []
        while self._captions and self._captions[0][0] <= self._segment_frames:
            captions.append(self._captions.popleft()[1])
        self._segment_frames += 1
        return " ".join(captions)

    # --- the clock ---------------------------------------------------------------------------

    async def run(self) -> None:
        """The clock: a tick every 1/fps seconds, for as long as the session lives."""
        loop = asyncio.get_running_loop()
        start = loop.time() - self.tick / self.fps
        while True:
            delay = start + self.tick / self.fps - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0 / self.fps:
                self._on_late_tick()
            await self.play_tick()

    async def play_tick(self) -> None:
        """One tick, now: the next speech frame (or an idle frame and silence) goes out."""
        if self._queue and not self.paused:
            queued: QueuedFrame | None = self._queue.popleft()
            picture, audio = queued.frame.video, queued.frame.audio
            self._idle_ahead.clear()
            self._idle_rendering = None
        else:
            queued, audio = None, self._silence
            picture = await self._idle_picture()
        changed = picture is not self._shown
        self._send(picture, changed, audio)
        for listener in self._frame_listeners:
            listener(picture if changed else None, audio)
        if queued is not None:
            self._report(queued)
        elif self._playing_turn is not None and not self.paused:
            self._gap_ticks += 1  # mid-reply, nothing rendered in time: a gap the listener hears
            self._longest_gap_ticks = max(self._longest_gap_ticks, self._gap_ticks)
        self.tick += 1

    async def _idle_picture(self) -> np.ndarray:
        """The next idle picture, the next ones rendered before they are needed. Once a picture is on screen
        the clock never waits for the stream's thread: while that thread is busy (rendering speech, or
        waiting for a late remote worker), the picture on screen stays, and the audio, the clock, goes on."""
        rendering = self._idle_rendering
        if rendering is not None and (rendering.done() or self._shown is None):
            self._idle_ahead.extend(await rendering)
            self._idle_rendering = rendering = None
        if rendering is None and len(self._idle_ahead) <= 1:
            self._idle_rendering = asyncio.get_running_loop().run_in_executor(self._executor, self._idle_frames)
            if self._shown is None and not self._idle_ahead:  # the very first picture: there is none to show yet
                return await self._idle_picture()
        return self._idle_ahead.popleft() if self._idle_ahead else self._shown  # type: ignore[return-value]

    def _report(self, queued: QueuedFrame) -> None:
        now = time.monotonic()
        self._gap_ticks = 0
        if self._playing_turn != queued.turn:
            self._playing_turn = queued.turn
            self._longest_gap_ticks = 0
            self._notify(PlaybackEvent(Playback.STARTED, queued.turn, now))
        if queued.caption:
            self._notify(PlaybackEvent(Playback.SPOKEN, queued.turn, now, caption=queued.caption))
        if queued.frame.segment_end:
            self._playing_turn = None
            self._notify(PlaybackEvent(Playback.FINISHED, queued.turn, now, self._longest_gap_ticks / self.fps))

    def _notify(self, event: PlaybackEvent) -> None:
        for listener in self._playback_listeners:
            listener(event)

    def _send(self, picture: np.ndarray, changed: bool, audio: np.ndarray) -> None:
        if changed or self.tick - self._video_tick >= self.still_stride:
            self._shown, self._video_tick = picture, self.tick
            video_frame = picture_frame(picture)
            video_frame.pts = self.tick * VIDEO_CLOCK_RATE // self.fps
            video_frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
            self.video.offer(video_frame)
            self.frames_sent += 1
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
        self._pending_pcm = np.concatenate([self._pending_pcm, pcm])
        packet = round(self.sample_rate * self.audio_packet_s)
        while len(self._pending_pcm) >= packet:
            for encoded in self._opus.encode(self._pending_pcm[:packet], self._audio_samples_sent):
                self.audio.offer(encoded)
            self._pending_pcm = self._pending_pcm[packet:]
            self._audio_samples_sent += packet

    def close(self) -> None:
        self._closed = True
        self.audio.stop()
        self.video.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

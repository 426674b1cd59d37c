"""The output clock never waits for the lip-sync stream's thread: audio is the clock."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from engines.avatar import Avatar
from engines.base import AVFrame, LipSyncEngine, LipSyncStream
from media_server.config import MediaSettings
from media_server.media.timeline import AvatarOutput
from media_server.testing.fakes import NumberedLipSync, NumberedStream, blank_avatar, numbered_picture, picture_number


class StallingLipSync(LipSyncEngine):
    """Numbered frames, but rendering speech holds the stream's thread until ``release`` is set (a slow
    engine, or a remote worker that does not answer)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.rendering = threading.Event()

    def prepare(self, avatar: Avatar) -> None:
        pass

    def open_stream(self, avatar: Avatar, fps: int, sample_rate: int) -> LipSyncStream:
        engine = self

        class Stalling(NumberedStream):
            def pull(self) -> list[AVFrame]:
                engine.rendering.set()
                engine.release.wait(10)
                return super().pull()

        return Stalling(sample_rate // fps)


async def test_a_stalled_lipsync_thread_neither_delays_the_clock_nor_silences_it() -> None:
    engine = StallingLipSync()
    late: list[int] = []
    output = AvatarOutput(engine, blank_avatar(), MediaSettings(), "stall", on_late_tick=lambda: late.append(1))
    clock = asyncio.create_task(output.run())
    audio_sent: list[int] = []
    output.add_frame_listener(lambda picture, audio: audio_sent.append(len(audio)))
    try:
        await asyncio.sleep(0.2)
        speaking = asyncio.create_task(output.speak(1, np.full(48000, 0.1, np.float32)))
        await asyncio.to_thread(engine.rendering.wait, 5)
        ticks_before, started = output.tick, asyncio.get_running_loop().time()
        await asyncio.sleep(1.0)  # the stream's thread is stuck all this time
        elapsed = asyncio.get_running_loop().time() - started
        assert output.tick - ticks_before >= round(elapsed * output.fps) - 2, "the clock waited for the stream"
        assert late == []
        engine.release.set()
        await speaking
    finally:
        engine.release.set()
        clock.cancel()
        output.close()
    assert set(audio_sent) == {output.samples_per_frame}


@pytest.mark.parametrize("drop", ["clear", "discard"])
async def test_a_render_that_finishes_after_its_turn_was_dropped_never_plays(drop: str) -> None:
    # A barge-in clears the output at once, but cancelling the turn's task takes a loop iteration or two:
    # a render finishing in between must not put the interrupted reply back on the air.
    engine = StallingLipSync()
    output = AvatarOutput(engine, blank_avatar(), MediaSettings(), "drop")
    try:
        if drop == "discard":
            output.hold(1)  # a speculative reply, never confirmed
        speaking = asyncio.create_task(output.speak(1, np.full(9600, 0.1, np.float32)))
        await asyncio.to_thread(engine.rendering.wait, 5)
        if drop == "clear":
            output.clear()
        else:
            output.discard(1)
        engine.release.set()
        await speaking  # not cancelled: its render comes back after the drop
        assert output.queued_frames == 0
        for _ in range(10):
            await output.play_tick()
        assert not output.speaking
        await output.speak(2, np.full(9600, 0.1, np.float32))
        assert output.queued_frames > 0, "the next turn plays as usual"
    finally:
        engine.release.set()
        output.close()


class Moving(NumberedLipSync):
    """Idle frames that all differ (a head that never stops moving)."""

    def open_stream(self, avatar: Avatar, fps: int, sample_rate: int) -> LipSyncStream:
        class MovingStream(NumberedStream):
            count = 0

            def idle_frame(self, elapsed_frames: int = 1) -> np.ndarray:
                self.count += 1
                return numbered_picture(self.count)

        return MovingStream(sample_rate // fps)


async def test_idle_frames_are_rendered_before_they_are_needed() -> None:
    output = AvatarOutput(Moving(), blank_avatar(), MediaSettings(), "idle")
    pictures: list[np.ndarray | None] = []
    output.add_frame_listener(lambda picture, audio: pictures.append(picture))
    try:
        for _ in range(50):
            await output.play_tick()
            await asyncio.sleep(1 / output.fps)
    finally:
        output.close()
    # Every tick shows the next picture, in order: none waited for its render, none was shown twice.
    assert [picture_number(p) if p is not None else None for p in pictures] == list(range(1, 51))


@pytest.mark.parametrize("packet_ms", [20, 40, 60])
async def test_the_audio_leaves_in_opus_packets_of_the_configured_length(packet_ms: int) -> None:
    output = AvatarOutput(NumberedLipSync(), blank_avatar(), MediaSettings(audio_packet_ms=packet_ms), "packets")
    try:
        for _ in range(6):  # 240 ms at 25 fps
            await output.play_tick()
        packets = [await asyncio.wait_for(output.audio.recv(), 1.0) for _ in range(240 // packet_ms)]
    finally:
        output.close()
    assert [len(packet.opaque) for packet in packets] == [output.sample_rate * packet_ms // 1000] * len(packets)

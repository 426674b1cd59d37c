"""Remote lip-sync against a real nats-server: workers lease, render in order, refuse when full, and the
node renders whatever a worker does not deliver in time, so every frame still carries its own audio."""

from __future__ import annotations

import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from engines.avatar import Avatar, load_avatar
from engines.base import AVFrame, LipSyncEngine
from engines.registry import create_engine
from media_server.cluster.lipsync import RemoteLipSync
from media_server.testing.cluster import InProcessWorker, LoopThread, NatsServer, remote_lipsync, wait_until
from tests.test_engine_contracts import AVATAR_DIR, FPS, RATE, SPF, speech_like

pytestmark = pytest.mark.timeout(120)


def warp(seed: int = 11) -> LipSyncEngine:
    engine = create_engine("lipsync", "warp", {"seed": seed})
    assert isinstance(engine, LipSyncEngine)
    return engine


class SlowWarp(LipSyncEngine):
    """The warp engine, taking ``delay_s`` longer over every pull: a worker that cannot keep up."""

    def __init__(self, delay_s: float) -> None:
        self.inner, self.delay_s = warp(), delay_s

    def prepare(self, avatar: Avatar) -> None:
        self.inner.prepare(avatar)

    def open_stream(self, avatar: Avatar, fps: int, sample_rate: int):  # type: ignore[no-untyped-def]
        stream, delay_s = self.inner.open_stream(avatar, fps, sample_rate), self.delay_s
        pull = stream.pull

        def slow_pull() -> list[AVFrame]:
            time.sleep(delay_s)
            return pull()

        stream.pull = slow_pull  # type: ignore[method-assign]
        return stream


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsServer]:
    server = NatsServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return load_avatar(AVATAR_DIR)


@pytest.fixture
def node(nats: NatsServer, loop: LoopThread, avatar: Avatar) -> Iterator[RemoteLipSync]:
    engine = remote_lipsync(nats.url, loop, warp(), lipsync_chunk_deadline_s=3.0, lipsync_lease_timeout_s=3.0)
    engine.prepare(avatar)
    yield engine
    loop.run(engine.link.close())


def speak(stream, audio: np.ndarray, piece_s: float = 0.2, between=None) -> list[AVFrame]:  # type: ignore[no-untyped-def]
    """Push ``audio`` as the output does (pieces, pulling after each); ``between(i)`` runs before piece i."""
    frames, piece = [], int(piece_s * RATE)
    for index, start in enumerate(range(0, len(audio), piece)):
        if between is not None:
            between(index)
        stream.push_audio(audio[start : start + piece])
        frames += stream.pull()
    stream.end_segment()
    return frames + stream.pull()


def assert_frames_carry_the_audio(frames: list[AVFrame], audio: np.ndarray) -> None:
    assert len(frames) == -(-len(audio) // SPF)
    padded = np.concatenate([audio, np.zeros(-len(audio) % SPF, np.float32)])
    np.testing.assert_array_equal(np.concatenate([frame.audio for frame in frames]), padded)
    assert [frame.segment_end for frame in frames] == [False] * (len(frames) - 1) + [True]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(cv2.PSNR(a, b))


def test_a_worker_renders_the_speech_the_node_would_have(nats, loop, node, avatar) -> None:
    worker = InProcessWorker(nats, loop, warp(), "w-render")
    try:
        audio = speech_like(1.5, seed=1)
        frames = speak(node.open_stream(avatar, FPS, RATE), audio)
        here = speak(warp().open_stream(avatar, FPS, RATE), audio)
    finally:
        worker.stop()
    assert_frames_carry_the_audio(frames, audio)
    assert node.stats()["frames_remote"] == len(frames) and node.stats()["frames_local"] == 0
    assert worker.service.stats["frames"] == len(frames)
    # The same engine and seed on the worker: the same pictures, but for JPEG's loss.
    assert min(psnr(remote.video, local.video) for remote, local in zip(frames, here, strict=True)) > 30


def test_a_worker_dying_mid_speech_leaves_no_frame_without_its_audio_and_the_next_turn_finds_another(
    nats, loop, node, avatar
) -> None:
    first = InProcessWorker(nats, loop, warp(), "w-dies")
    stream = node.open_stream(avatar, FPS, RATE)
    audio = speech_like(2.0, seed=2)
    frames = speak(stream, audio, between=lambda index: first.stop() if index == 4 else None)
    assert_frames_carry_the_audio(frames, audio)
    assert node.stats()["frames_remote"] > 0 and node.stats()["frames_local"] > 0
    second = InProcessWorker(nats, loop, warp(), "w-takes-over")
    try:
        rendered_before = node.stats()["frames_remote"]
        next_turn = speech_like(0.8, seed=3)
        assert_frames_carry_the_audio(speak(stream, next_turn), next_turn)
        assert second.service.stats["frames"] == node.stats()["frames_remote"] - rendered_before > 0
    finally:
        second.stop()


def test_a_full_worker_refuses_and_its_session_renders_here_until_it_has_room(nats, loop, node, avatar) -> None:
    worker = InProcessWorker(nats, loop, warp(), "w-one-seat", sessions=1)
    try:
        busy, other = node.open_stream(avatar, FPS, RATE), node.open_stream(avatar, FPS, RATE)
        busy.push_audio(speech_like(0.4, seed=4))
        busy.pull()
        assert worker.service.leases  # the only seat is taken...
        audio = speech_like(0.6, seed=5)
        local_before = node.stats()["frames_local"]
        assert_frames_carry_the_audio(speak(other, audio), audio)
        assert node.stats()["frames_local"] - local_before == -(-len(audio) // SPF)  # ...so it rendered here
        busy.end_segment()
        busy.pull()  # the segment ends: its lease is released
        wait_until(lambda: worker.service.accepting, 5, "the worker did not take leases again")
        remote_before = node.stats()["frames_remote"]
        assert_frames_carry_the_audio(speak(other, audio), audio)
        assert node.stats()["frames_remote"] > remote_before
    finally:
        worker.stop()


def test_a_chunk_past_its_deadline_is_rendered_here(nats, loop, avatar) -> None:
    engine = remote_lipsync(nats.url, loop, warp(), lipsync_chunk_deadline_s=0.15, lipsync_lease_timeout_s=3.0)
    engine.prepare(avatar)
    worker = InProcessWorker(nats, loop, SlowWarp(delay_s=0.5), "w-slow")
    try:
        audio = speech_like(1.0, seed=6)
        started = time.monotonic()
        assert_frames_carry_the_audio(speak(engine.open_stream(avatar, FPS, RATE), audio), audio)
        assert time.monotonic() - started < 2.0  # one late chunk, then no more waiting on that worker
    finally:
        worker.stop()
        loop.run(engine.link.close())
    assert engine.stats()["chunks_late"] == 1 and engine.stats()["frames_local"] > 0

"""The warp lip-sync engine on the real default avatar, driven by speech espeak-ng makes at test time."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from engines.audio import resample
from engines.avatar import Avatar, load_avatar
from engines.base import AVFrame
from engines.lipsync.warp import WarpLipSync
from media_server.testing.speech_corpus import espeak

AVATAR_DIR = Path(__file__).resolve().parents[1] / "avatars" / "default"
FPS, RATE = 25, 48000
SPF = RATE // FPS


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return load_avatar(AVATAR_DIR)


@pytest.fixture(scope="module")
def engine(avatar: Avatar) -> WarpLipSync:
    engine = WarpLipSync(WarpLipSync.Settings(seed=7))
    engine.warm_up()
    engine.prepare(avatar)
    return engine


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    audio, rate = espeak("Hello there. How are you doing today? I would love to see the moon.")
    return resample(audio, rate, RATE)


def mouth_crop(frame: np.ndarray, avatar: Avatar) -> np.ndarray:
    """Grey square around the mouth, half a face width wide."""
    box = avatar.face_boxes[0]
    (mx, my), half = box.mouth_center, box.width // 4
    crop = frame[int(my) - half : int(my) + half, int(mx) - half : int(mx) + half]
    return crop.astype(np.float32).mean(axis=2)


def rms(frame: AVFrame) -> float:
    return float(np.sqrt(np.mean(frame.audio.astype(np.float64) ** 2)))


def test_frames_pair_exactly_with_pushed_audio(engine: WarpLipSync, avatar: Avatar, speech: np.ndarray) -> None:
    stream = engine.open_stream(avatar, FPS, RATE)
    second = speech[: 5 * SPF + 123]
    frames: list[AVFrame] = []
    for piece in np.array_split(speech, 7):  # uneven pieces, pulled in between
        stream.push_audio(piece)
        frames += stream.pull()
    stream.end_segment()
    stream.push_audio(second)
    stream.end_segment()
    frames += stream.pull()
    assert stream.pull() == []

    def padded(audio: np.ndarray) -> np.ndarray:
        return np.pad(audio, (0, -len(audio) % SPF))

    expected = np.concatenate([padded(speech), padded(second)])
    assert all(f.audio.shape == (SPF,) and f.audio.dtype == np.float32 for f in frames)
    np.testing.assert_array_equal(np.concatenate([f.audio for f in frames]), expected)
    first_count = len(padded(speech)) // SPF
    ends = [i for i, f in enumerate(frames) if f.segment_end]
    assert ends == [first_count - 1, len(frames) - 1]
    assert all(f.speech for f in frames)
    assert all(f.video.shape == avatar.frames[0].shape and f.video.dtype == np.uint8 for f in frames)


def test_one_frame_of_audio_is_held_back_until_the_next_arrives(engine: WarpLipSync, avatar: Avatar) -> None:
    stream = engine.open_stream(avatar, FPS, RATE)
    stream.push_audio(np.zeros(3 * SPF, np.float32))
    assert len(stream.pull()) == 2
    stream.push_audio(np.zeros(SPF // 2, np.float32))
    assert stream.pull() == []
    stream.end_segment()
    tail = stream.pull()
    assert len(tail) == 2 and tail[-1].segment_end


def closed_mouths(engine: WarpLipSync, avatar: Avatar, count: int) -> list[np.ndarray]:
    """Mouth crops of a stream that never speaks: with the engine's fixed seed its head moves and blinks
    exactly like every other stream's, so frame k is frame k of a speaking stream with the mouth shut."""
    stream = engine.open_stream(avatar, FPS, RATE)
    return [mouth_crop(stream.idle_frame(), avatar) for _ in range(count)]


def test_mouth_follows_loudness(engine: WarpLipSync, avatar: Avatar, speech: np.ndarray) -> None:
    stream = engine.open_stream(avatar, FPS, RATE)
    gap_frames = FPS  # one second of silence between two utterances
    stream.push_audio(np.concatenate([speech[: len(speech) // SPF * SPF], np.zeros(gap_frames * SPF), speech]))
    stream.end_segment()
    frames = stream.pull()
    closed = closed_mouths(engine, avatar, len(frames))
    change = np.array([np.abs(mouth_crop(f.video, avatar) - c).mean() for f, c in zip(frames, closed)])
    loudness = np.array([rms(f) for f in frames])

    first = len(speech) // SPF
    silent = change[first + 10 : first + gap_frames]  # the mouth has had time to close
    loud = change[loudness >= np.percentile(loudness, 75)]
    assert loud.mean() > 6.0
    assert loud.mean() > 5 * silent.max()
    assert np.corrcoef(change, loudness)[0, 1] > 0.5


def test_idle_mouth_is_still_but_the_face_lives(engine: WarpLipSync, avatar: Avatar, speech: np.ndarray) -> None:
    stream = engine.open_stream(avatar, FPS, RATE)
    idle = [stream.idle_frame() for _ in range(8 * FPS)]
    mouths = [mouth_crop(f, avatar) for f in idle[: 2 * FPS]]
    steps = [np.abs(a - b).mean() for a, b in zip(mouths, mouths[1:])]
    darkness = [(m < 70).mean() for m in mouths]
    # only the head's steps of a third of a pixel; speech changes it by several grey levels a frame
    assert max(steps) < 2.5
    assert max(darkness) < darkness[0] + 0.005  # nothing opens

    whole = [np.abs(f.astype(np.float32) - idle[0]).mean() for f in idle]
    assert max(whole) > 0.5  # head motion and blinks: never a frozen photo


def test_an_idle_stream_changes_its_picture_only_to_blink_or_move_the_head(engine: WarpLipSync, avatar: Avatar) -> None:
    stream = engine.open_stream(avatar, FPS, RATE)
    idle = [stream.idle_frame() for _ in range(20 * FPS)]
    changed = [later is not earlier for earlier, later in itertools.pairwise(idle)]
    for (earlier, later), new in zip(itertools.pairwise(idle), changed, strict=True):
        assert new or not later.flags.writeable  # a still frame is the previous one again, read-only
        if new:
            assert np.abs(later.astype(np.int16) - earlier).max() > 0  # and a new one differs
    assert 1 < sum(changed) / 20 < 8  # a few changes a second, not one a tick
    runs = [len(run) for run in "".join("x" if new else " " for new in changed).split()]
    assert max(runs) >= 6  # a blink: a new picture every tick while the lid moves


def test_speech_joins_idle_without_a_jump(engine: WarpLipSync, avatar: Avatar, speech: np.ndarray) -> None:
    stream = engine.open_stream(avatar, FPS, RATE)
    idle = [stream.idle_frame() for _ in range(30)]
    stream.push_audio(speech)
    stream.end_segment()
    spoken = [f.video for f in stream.pull()]
    after = [stream.idle_frame() for _ in range(3)]
    top = int(avatar.face_boxes[0].y0 + 0.55 * avatar.face_boxes[0].height)  # above the mouth

    def step(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a[:top].astype(np.float32) - b[:top]).mean())

    idle_steps = [step(a, b) for a, b in zip(idle, idle[1:])]
    assert step(idle[-1], spoken[0]) < 2 * max(idle_steps) + 0.1
    assert step(spoken[-1], after[0]) < 2 * max(idle_steps) + 0.1


def test_clear_drops_pending_audio_and_the_mouth_closes(
    engine: WarpLipSync, avatar: Avatar, speech: np.ndarray
) -> None:
    stream = engine.open_stream(avatar, FPS, RATE)
    loudest = int(np.argmax([np.abs(speech[i : i + SPF]).mean() for i in range(0, len(speech) - SPF, SPF)]))
    stream.push_audio(speech[: (loudest + 2) * SPF])
    opened = stream.pull()[-1]
    stream.push_audio(speech[(loudest + 2) * SPF :])
    stream.clear()
    stream.end_segment()
    assert stream.pull() == []

    closed = closed_mouths(engine, avatar, loudest + 16)
    relaxing = [np.abs(mouth_crop(stream.idle_frame(), avatar) - c).mean() for c in closed[loudest + 1 :]]
    assert np.abs(mouth_crop(opened.video, avatar) - closed[loudest]).mean() > 5.0
    assert relaxing[0] > relaxing[4] > relaxing[-1]  # it closes over a few frames, not at once
    assert relaxing[-1] < 1.0

    fresh = speech[: 3 * SPF]
    stream.push_audio(fresh)
    stream.end_segment()
    np.testing.assert_array_equal(np.concatenate([f.audio for f in stream.pull()]), fresh)


@pytest.mark.parametrize(("fps", "rate"), [(24, 16000), (7, 48000), (0, 48000)])
def test_frame_must_hold_a_whole_number_of_samples(engine: WarpLipSync, avatar: Avatar, fps: int, rate: int) -> None:
    with pytest.raises(ValueError):
        engine.open_stream(avatar, fps, rate)


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError):
        WarpLipSync.Settings(blink_interval_s=(5.0, 2.0))
    with pytest.raises(ValidationError):
        WarpLipSync.Settings.model_validate({"mouth_gainn": 1.0})


def test_video_avatar_plays_forwards_then_backwards(avatar: Avatar) -> None:
    base = avatar.frames[0].astype(np.int16)
    frames = tuple(np.clip(base + 12 * k, 0, 255).astype(np.uint8) for k in range(3))
    video = replace(avatar, frames=frames, face_boxes=avatar.face_boxes * 3, source_hash="three-frame-loop")
    engine = WarpLipSync(WarpLipSync.Settings(seed=1, head_motion_px=0.0))
    stream = engine.open_stream(video, FPS, RATE)
    brightness = [float(stream.idle_frame().mean()) for _ in range(7)]
    order = np.argsort(np.argsort(brightness[:3]))
    assert list(order) == [0, 1, 2]
    np.testing.assert_allclose(brightness[3:7], [brightness[1], brightness[0], brightness[1], brightness[2]], atol=0.5)

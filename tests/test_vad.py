"""Silero VAD on speech synthesised at test time, on silence and on low noise."""

from __future__ import annotations

import numpy as np
import pytest

from engines.audio import resample
from engines.embedded_models import SILERO_VAD_SHA256
from engines.vad.silero import SileroVAD
from media_server.testing.speech_corpus import espeak

WINDOW = SileroVAD.window_samples


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    engine = SileroVAD(SileroVAD.Settings())
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    audio, rate = espeak("The quick brown fox jumps over the lazy dog near the river bank.", "en-us", 150)
    return resample(audio, rate, SileroVAD.sample_rate)


def windows(audio: np.ndarray) -> list[np.ndarray]:
    return [audio[start : start + WINDOW] for start in range(0, len(audio) - WINDOW + 1, WINDOW)]


def probabilities(vad: SileroVAD, audio: np.ndarray) -> list[float]:
    stream = vad.open_stream()
    return [stream.speech_probability(window) for window in windows(audio)]


def test_voiced_windows_are_speech(vad: SileroVAD, speech: np.ndarray) -> None:
    chunks = windows(speech)
    loudness = np.array([np.sqrt(np.mean(chunk**2)) for chunk in chunks])
    voiced = loudness > 0.25 * loudness.max()
    speech_probabilities = np.array(probabilities(vad, speech))
    assert voiced.sum() >= 20
    assert np.median(speech_probabilities[voiced]) > 0.9
    assert np.mean(speech_probabilities[voiced] > 0.5) > 0.85


def test_silence_and_low_noise_are_not_speech(vad: SileroVAD) -> None:
    two_seconds = 2 * SileroVAD.sample_rate
    silence = np.zeros(two_seconds, dtype=np.float32)
    noise = (np.random.default_rng(0).standard_normal(two_seconds) * 0.003).astype(np.float32)
    assert max(probabilities(vad, silence)) < 0.1
    assert max(probabilities(vad, noise)) < 0.2


def test_streams_are_independent(vad: SileroVAD, speech: np.ndarray) -> None:
    silence = np.zeros_like(speech)
    speech_alone, silence_alone = probabilities(vad, speech), probabilities(vad, silence)
    speech_stream, silence_stream = vad.open_stream(), vad.open_stream()
    interleaved = [
        (speech_stream.speech_probability(a), silence_stream.speech_probability(b))
        for a, b in zip(windows(speech), windows(silence), strict=True)
    ]
    assert [pair[0] for pair in interleaved] == pytest.approx(speech_alone, abs=1e-6)
    assert [pair[1] for pair in interleaved] == pytest.approx(silence_alone, abs=1e-6)


def test_reset_forgets_the_past(vad: SileroVAD, speech: np.ndarray) -> None:
    stream = vad.open_stream()
    for window in windows(speech):
        stream.speech_probability(window)
    stream.reset()
    fresh = vad.open_stream()
    first_windows = windows(speech)[:10]
    assert [stream.speech_probability(w) for w in first_windows] == pytest.approx(
        [fresh.speech_probability(w) for w in first_windows], abs=1e-6
    )


def test_rejects_wrong_window_size(vad: SileroVAD) -> None:
    with pytest.raises(ValueError, match="512"):
        vad.open_stream().speech_probability(np.zeros(WINDOW * 2, dtype=np.float32))


def test_describe_reports_the_pinned_model(vad: SileroVAD) -> None:
    description = vad.describe()
    assert description["sha256"] == SILERO_VAD_SHA256
    assert str(description["model_path"]).endswith(".onnx")

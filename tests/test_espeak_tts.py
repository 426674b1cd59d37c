"""The espeak-ng engine, synthesising for real in its worker processes, heard by the embedded Whisper."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engines.asr.faster_whisper import FasterWhisperASR
from engines.audio import resample
from engines.base import EngineConfigError, SpeechChunk
from engines.registry import create_engine
from engines.tts.espeak.engine import EspeakTTS, EspeakWorkerError
from engines.tts.espeak.worker import split_clauses
from engines.tts.voices import best_voice
from media_server.testing.speech_corpus import word_error_rate

TWO_SENTENCES = ["Guten Morgen, wie geht es dir?", "Mir geht es gut."]
# Sentences the embedded Whisper base hears well from espeak-ng (it misses words in many others).
HEARD = {
    "de": "Hallo, wie geht es Ihnen? Heute ist ein schöner Tag.",
    "fr": "Bonjour, je m'appelle Marie. J'habite à Paris avec ma famille.",
    "es": "Buenos días, ¿cómo estás hoy? Hace buen tiempo, y vamos al parque.",
}
LONG_STORY = " ".join(f"Das ist der Satz Nummer {n}, und er hat noch ein paar Worte." for n in range(200))


@pytest.fixture(scope="module")
def engine() -> Iterator[EspeakTTS]:
    tts = create_engine("tts", "espeak", {})
    assert isinstance(tts, EspeakTTS)
    tts.warm_up()
    yield tts
    tts.close()


def audio_of(chunks: list[SpeechChunk]) -> np.ndarray:
    return np.concatenate([chunk.audio for chunk in chunks])


def seconds(chunks: list[SpeechChunk]) -> float:
    return sum(len(chunk.audio) / chunk.sample_rate for chunk in chunks)


def texts(chunks: list[SpeechChunk]) -> list[str]:
    return [chunk.text for chunk in chunks if chunk.starts_sentence]


@pytest.mark.parametrize("language", list(HEARD))
def test_whisper_hears_the_words_in_the_voice_of_their_language(engine: EspeakTTS, language: str) -> None:
    asr = FasterWhisperASR(FasterWhisperASR.Settings(language=language, beam_size=5))
    text = HEARD[language]

    def error_rate(voice: str) -> float:
        audio = resample(audio_of(list(engine.synthesize(text, voice))), 22050, asr.sample_rate)
        heard = asr.transcribe(audio).text
        print(f"\n{voice}: {heard!r}")
        return word_error_rate(text, heard)

    assert error_rate(language) <= 0.4
    # The bound tells voices apart: read with another language's rules, the same words are not understood.
    assert error_rate("pl") > 0.6


def test_the_first_clause_is_sent_before_the_rest_is_synthesised(engine: EspeakTTS) -> None:
    arrivals: list[float] = []
    chunks: list[SpeechChunk] = []
    for chunk in engine.synthesize(" ".join(TWO_SENTENCES), "de"):
        arrivals.append(time.perf_counter())
        chunks.append(chunk)

    assert texts(chunks) == TWO_SENTENCES
    assert [chunk.starts_sentence for chunk in chunks] == [True, False, True]  # "Guten Morgen," on its own
    for chunk in chunks:
        assert chunk.sample_rate == 22050 and chunk.phonemes is None
        assert chunk.audio.dtype == np.float32 and chunk.audio.ndim == 1
        assert 0.05 < float(np.abs(chunk.audio).max()) <= 1.0
    first_clause = seconds(list(engine.synthesize("Guten Morgen,", "de")))
    assert len(chunks[0].audio) / 22050 == pytest.approx(first_clause, abs=0.01)
    assert seconds(chunks[:1]) < 0.3 * seconds(chunks)
    assert arrivals == sorted(arrivals) and arrivals[0] < arrivals[-1]


def test_closing_the_iterator_abandons_the_rest(engine: EspeakTTS) -> None:
    started = time.perf_counter()
    whole_chunks = sum(1 for _ in engine.synthesize(LONG_STORY, "de"))
    whole = time.perf_counter() - started

    abandoned = engine.synthesize(LONG_STORY, "de")
    assert next(abandoned).text == "Das ist der Satz Nummer 0, und er hat noch ein paar Worte."
    abandoned.close()
    started = time.perf_counter()
    after = list(engine.synthesize(" ".join(TWO_SENTENCES), "de"))
    answered = time.perf_counter() - started

    assert list(abandoned) == []
    assert texts(after) == TWO_SENTENCES
    assert whole_chunks == 400
    # The worker stopped after the clause it was on, rather than speaking the story to the end first.
    assert answered < whole / 4, f"answered after {answered:.3f} s; the whole story took {whole:.3f} s"


def test_slower_speech_is_longer(engine: EspeakTTS) -> None:
    text = " ".join(TWO_SENTENCES)
    normal = seconds(list(engine.synthesize(text, "de")))
    slow = seconds(list(engine.synthesize(text, "de", speed=0.7)))
    fast = seconds(list(engine.synthesize(text, "de", speed=1.5)))
    assert slow > 1.25 * normal
    assert fast < 0.85 * normal


def test_a_killed_worker_is_reported_and_replaced(engine: EspeakTTS, caplog: pytest.LogCaptureFixture) -> None:
    [old_pid] = engine.worker_pids
    os.kill(old_pid, signal.SIGSTOP)  # the request is surely still in flight when the worker dies
    stream = engine.synthesize(LONG_STORY, "de")
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(EspeakWorkerError, match="espeak-ng worker exited while synthesising"):
        list(stream)

    with caplog.at_level(logging.WARNING):
        assert texts(list(engine.synthesize(" ".join(TWO_SENTENCES), "de"))) == TWO_SENTENCES
    assert engine.worker_pids != [old_pid]
    assert f"replacing espeak-ng worker {old_pid}, which died" in caplog.text


def test_an_unknown_voice_names_the_configured_ones(engine: EspeakTTS) -> None:
    with pytest.raises(ValueError, match="unknown voice 'klingon'; available voices: en-us, en, de, fr"):
        engine.synthesize("Hallo.", "klingon")


def test_default_voices_cover_the_common_languages(engine: EspeakTTS) -> None:
    for language in ("en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "tr", "zh", "ja", "ar", "hi"):
        assert language in engine.voices
    assert engine.default_voice == "en-us"
    chinese = engine.describe()["voices"]["zh"]  # type: ignore[index]
    assert chinese == "Chinese (Mandarin, latin as English) (sit/cmn)"
    assert audio_of(list(engine.synthesize("你好。今天天气很好，我们去公园吧！", "zh"))).size > 22050


@pytest.mark.parametrize(
    ("language", "voice"),
    [("de-DE", "de"), ("de", "de"), ("pt-BR", "pt-br"), ("pt", "pt"), ("en", "en"), ("en-US", "en-us"),
     ("en_AU", "en"), ("zh-CN", "zh"), ("fr-CA", "fr"), ("sw", None)],
)  # fmt: skip
def test_a_language_tag_picks_the_best_configured_voice(engine: EspeakTTS, language: str, voice: str | None) -> None:
    assert engine.voice_for_language(language) == voice


def test_a_language_spoken_by_several_voices_picks_espeaks_preferred_one() -> None:
    voices = {"es-419": [("es-419", 5), ("es-mx", 6)], "es": [("es", 5)]}
    assert best_voice("es-MX", voices) == "es-419"
    assert best_voice("es-ES", voices) == "es"


def test_clauses_split_at_punctuation_but_not_at_abbreviations() -> None:
    assert list(split_clauses("Das ist z. B. ein Test am 3. Mai. Gut, oder?")) == [
        ("Das ist z. B. ein Test am 3. Mai.", ["Das ist z. B. ein Test am 3. Mai."]),
        ("Gut, oder?", ["Gut,", "oder?"]),
    ]
    assert list(split_clauses("Es kostet 3,50 Euro: um 10:30 Uhr.")) == [
        ("Es kostet 3,50 Euro: um 10:30 Uhr.", ["Es kostet 3,50 Euro:", "um 10:30 Uhr."])
    ]
    assert list(split_clauses("你好。今天天气很好，我们去公园吧！")) == [
        ("你好。", ["你好。"]),
        ("今天天气很好，我们去公园吧！", ["今天天气很好，", "我们去公园吧！"]),
    ]


def test_describe_names_the_espeak_ng_it_loaded_and_the_process_boundary(engine: EspeakTTS) -> None:
    description = engine.describe()
    version = importlib.metadata.version("espeakng-loader")
    assert f"from PyPI package espeakng-loader {version}: " in str(description["source"])
    assert str(description["source"]).endswith("libespeak-ng.so")
    assert Path(str(description["data"])).name == "espeak-ng-data"
    assert int(description["languages"]) > 100  # type: ignore[call-overload]
    assert description["voices"]["de"] == "German (gmw/de)"  # type: ignore[index]
    assert description["words_per_minute"] == 165 and description["sample_rate"] == 22050
    assert "separate process (GPL-3.0 boundary)" in str(description["process"])


def test_libespeak_ng_is_never_loaded_into_this_process(engine: EspeakTTS) -> None:
    list(engine.synthesize("Nichts von espeak-ng läuft hier.", "de"))
    assert "libespeak-ng" not in Path("/proc/self/maps").read_text()


def test_the_systems_espeak_ng_is_the_fallback() -> None:
    tts = EspeakTTS(EspeakTTS.Settings(library="system", voices=["de"]))
    try:
        chunks = list(tts.synthesize(" ".join(TWO_SENTENCES), "de"))
        source = str(tts.describe()["source"])
    finally:
        tts.close()
    assert "from the system's libespeak-ng" in source
    assert texts(chunks) == TWO_SENTENCES
    assert 1.5 < seconds(chunks) < 5


def test_the_default_voice_is_always_available() -> None:
    tts = EspeakTTS(EspeakTTS.Settings(voices=["de"], default_voice="fr"))
    try:
        assert tts.voices == ["de", "fr"]
        assert texts(list(tts.synthesize("Bonjour.", "fr"))) == ["Bonjour."]
    finally:
        tts.close()


def test_a_voice_the_data_lacks_is_an_error_at_load() -> None:
    with pytest.raises(EngineConfigError, match=r"espeak-ng [\d.]+ .* has no voice 'qq-zz' .* Its voices: af, .* de, "):
        create_engine("tts", "espeak", {"voices": ["de", "qq-zz"]})


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"voices": ["de fr"]}, "not an espeak-ng voice name"),
        ({"words_per_minute": 20}, "words_per_minute"),
        ({"library": "download"}, "library"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_settings_are_refused_before_any_worker_starts(options: dict[str, object], problem: str) -> None:
    with pytest.raises(EngineConfigError, match=problem):
        create_engine("tts", "espeak", options)

"""The pure parts of the pipeline: configuration, turn policy, text chunking."""

from __future__ import annotations

import fractions
import itertools
import re

import av
import numpy as np
import pytest

from engines.audio import silence_before_onset
from media_server.config import ConfigError, TurnTakingSettings, load_settings
from media_server.conversation.chunker import SpeechChunker
from media_server.conversation.turn_policy import TurnEventKind, TurnPolicy
from media_server.media.microphone import CaptureClock
from media_server.media.timeline import lipsync_pieces
from media_server.testing.speech_corpus import word_error_rate

WINDOW = 0.032


def test_defaults_load_and_every_source_overrides(tmp_path):
    user_file = tmp_path / "facecast.toml"
    user_file.write_text("[server]\nport = 9000\nmax_sessions = 7\n[media]\nfps = 30\n")
    settings = load_settings(user_file, {"server.max_sessions": "9"}, environ={"FACECAST__MEDIA__FPS": "20"})
    assert settings.server.port == 9000
    assert settings.server.max_sessions == 9
    assert settings.media.fps == 20
    assert settings.asr.engine == "faster-whisper" and settings.asr.options["language"] == "en"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"server.port": "70000"}, "server.port"),
        ({"media.fps": "7"}, "multiple of fps"),
        ({"media.sample_rate": "44100"}, "Opus"),
        ({"server.default_persona": "nobody"}, "default_persona"),
        ({"server.colour": "blue"}, "server.colour"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(None, overrides, environ={})


def _feed(policy: TurnPolicy, pattern: list[tuple[float, int]], avatar_busy: bool = False):
    events, t = [], 0.0
    for probability, windows in pattern:
        for _ in range(windows):
            events += [(e.kind, round(e.at, 3)) for e in policy.on_window(probability, t, avatar_busy)]
            t += WINDOW
    return events


def kinds(events):
    return [kind for kind, _ in events]


def test_policy_finds_start_and_end_of_speech():
    policy = TurnPolicy(TurnTakingSettings(min_speech_ms=100, min_silence_ms=300, speculative_silence_ms=0), WINDOW)
    events = _feed(policy, [(0.0, 10), (0.9, 30), (0.0, 15)])
    assert kinds(events) == [TurnEventKind.USER_STARTED, TurnEventKind.USER_ENDED]
    assert events[0][1] == pytest.approx(10 * WINDOW)
    assert events[1][1] == pytest.approx(40 * WINDOW)


def test_policy_ignores_blips_shorter_than_min_speech_and_short_pauses():
    policy = TurnPolicy(TurnTakingSettings(min_speech_ms=150, min_silence_ms=400, speculative_silence_ms=0), WINDOW)
    assert _feed(policy, [(0.9, 2), (0.0, 10)]) == []
    events = _feed(policy, [(0.9, 20), (0.1, 5), (0.9, 20), (0.0, 20)])
    assert kinds(events) == [TurnEventKind.USER_STARTED, TurnEventKind.USER_ENDED]


def test_policy_marks_a_pause_for_speculation_then_resumes_or_ends():
    policy = TurnPolicy(TurnTakingSettings(min_silence_ms=500, speculative_silence_ms=160), WINDOW)
    events = _feed(policy, [(0.9, 20), (0.0, 7), (0.9, 20), (0.0, 20)])
    assert kinds(events) == [
        TurnEventKind.USER_STARTED,
        TurnEventKind.USER_PAUSED,
        TurnEventKind.USER_RESUMED,
        TurnEventKind.USER_PAUSED,
        TurnEventKind.USER_ENDED,
    ]


def test_policy_pauses_then_interrupts_a_speaking_avatar_once():
    policy = TurnPolicy(TurnTakingSettings(pause_avatar_after_ms=64, min_interruption_ms=320), WINDOW)
    events = _feed(policy, [(0.9, 20)], avatar_busy=True)
    assert kinds(events) == [TurnEventKind.AVATAR_PAUSE, TurnEventKind.INTERRUPT, TurnEventKind.USER_STARTED]
    pause_at = events[0][1]
    assert pause_at == pytest.approx(0.0)


def test_words_with_short_gaps_between_them_add_up_to_an_interruption():
    policy = TurnPolicy(TurnTakingSettings(pause_avatar_after_ms=64, min_interruption_ms=320), WINDOW)
    events = _feed(policy, [(0.9, 6), (0.0, 3), (0.9, 6)], avatar_busy=True)  # "wait," ... "stop"
    assert TurnEventKind.INTERRUPT in kinds(events)


def test_scattered_voiced_windows_pause_the_avatar_but_never_interrupt_it():
    # One voiced window in every five (residual echo, clatter): each gap is short enough to bridge,
    # so the stretch spans well over min_interruption_ms, but it is mostly silence.
    policy = TurnPolicy(
        TurnTakingSettings(pause_avatar_after_ms=64, min_interruption_ms=320, false_interruption_timeout_ms=400), WINDOW
    )
    events = _feed(policy, [(0.9, 1), (0.0, 4)] * 12 + [(0.0, 20)], avatar_busy=True)
    assert TurnEventKind.INTERRUPT not in kinds(events)
    assert TurnEventKind.USER_STARTED not in kinds(events)
    assert kinds(events)[-1] == TurnEventKind.AVATAR_RESUME


def test_a_cough_pauses_the_avatar_and_it_resumes():
    policy = TurnPolicy(
        TurnTakingSettings(pause_avatar_after_ms=64, min_interruption_ms=320, false_interruption_timeout_ms=400), WINDOW
    )
    events = _feed(policy, [(0.9, 5), (0.0, 20)], avatar_busy=True)
    assert kinds(events) == [TurnEventKind.AVATAR_PAUSE, TurnEventKind.AVATAR_RESUME]


def test_policy_caps_utterance_length():
    policy = TurnPolicy(TurnTakingSettings(max_utterance_s=2.0), WINDOW)
    events = _feed(policy, [(0.9, 100)])
    assert TurnEventKind.USER_ENDED in kinds(events)


def test_chunker_sends_first_clause_early_then_sentences():
    chunker = SpeechChunker(first_chunk_min_words=3)
    out = []
    for delta in ["Well, ", "the capital", " of France,", " as you know,", " is Paris.", " It is big", "! "]:
        out += chunker.feed(delta)
    out += chunker.flush()
    assert out == ["Well, the capital of France,", "as you know, is Paris.", "It is big!"]


def _chunks(text: str, chunker: SpeechChunker) -> list[str]:
    out = []
    for token in re.findall(r"\s*\S+", text):  # word by word, as an LLM streams it
        out += chunker.feed(token)
    return out + chunker.flush()


def test_chunker_starts_speaking_before_a_phrase_once_it_has_enough_words():
    assert _chunks("Jupiter is the largest planet in our solar system. It is huge.", SpeechChunker()) == [
        "Jupiter is the largest planet,",
        "in our solar system.",
        "It is huge.",
    ]
    # Too few words before the phrase ("It rises"), and "of" binds its noun phrase: one chunk each.
    assert _chunks("It rises in the east.", SpeechChunker()) == ["It rises in the east."]
    assert _chunks("The capital of France is Paris.", SpeechChunker()) == ["The capital of France is Paris."]
    # Only the first chunk is cut early; later sentences stay whole.
    assert _chunks("Yes. It is the largest planet in the sky.", SpeechChunker(first_chunk_min_words=1)) == [
        "Yes.",
        "It is the largest planet in the sky.",
    ]


def test_chunker_waits_until_the_phrase_word_is_complete_and_can_be_turned_off():
    chunker = SpeechChunker()
    assert chunker.feed("Jupiter is the largest planet in") == []  # "in" could still become "inside"
    assert chunker.feed("side") == []
    assert chunker.feed(" our") == []
    assert _chunks("Jupiter is the largest planet in our solar system.", SpeechChunker(phrase_cut=False)) == [
        "Jupiter is the largest planet in our solar system."
    ]


def test_chunker_ends_a_sentence_on_its_last_token_unless_the_dot_may_not_end_it():
    # The model's stop (a newline) is one token later: the one-sentence reply goes to TTS without it.
    chunker = SpeechChunker()
    assert chunker.feed("The capital of France is") == []
    assert chunker.feed(" Paris.") == ["The capital of France is Paris."]
    assert SpeechChunker().feed("Really?") == ["Really?"]
    assert SpeechChunker().feed('The play is called "Hamlet."') == ['The play is called "Hamlet."']
    # A number, an initialism or an abbreviation may go on: wait for the next token.
    for text in ("The answer is 3.", "I live in the U.S.", "Ask Dr.", "It opens at 5 p.m."):
        assert SpeechChunker().feed(text) == [], text
    assert _chunks("Mr. Smith is here. He is tall.", SpeechChunker()) == ["Mr. Smith is here.", "He is tall."]
    assert _chunks("It costs 3.5 dollars.", SpeechChunker()) == ["It costs 3.5 dollars."]


def test_a_turns_first_audio_goes_to_lip_sync_in_two_frame_pieces_then_in_fifth_seconds():
    assert lipsync_pieces(48000, 48000, turn_starts=True)[:3] == [(0, 3840), (3840, 7680), (7680, 17280)]
    assert lipsync_pieces(48000, 48000, turn_starts=False)[:2] == [(0, 9600), (9600, 19200)]
    for samples in (0, 1000, 3840, 48000, 50001):
        pieces = lipsync_pieces(samples, 48000, turn_starts=True)
        assert all(end == start for (_, end), (start, _) in itertools.pairwise(pieces))
        assert (pieces[0][0], pieces[-1][1]) == (0, samples) if samples else pieces == []


def test_chunker_flushes_text_without_punctuation_and_skips_empty():
    chunker = SpeechChunker()
    assert chunker.feed("Hello there") == []
    assert chunker.flush() == ["Hello there"]
    assert SpeechChunker().flush() == []


def test_word_error_rate_ignores_case_punctuation_and_how_small_numbers_are_written() -> None:
    assert word_error_rate("What is two plus three?", "what is 2 plus 3") == 0.0
    assert word_error_rate("How many legs does a spider have?", "How many lengths does a spider half?") == 2 / 7
    assert word_error_rate("one two", "") == 1.0


def test_silence_before_onset_keeps_ten_milliseconds_before_the_first_sound():
    rate = 48000
    tone = 0.3 * np.sin(np.arange(rate // 10) * 2 * np.pi * 220 / rate).astype(np.float32)
    hiss = np.full(int(0.04 * rate), 1e-4, np.float32)  # a voice model's near-silence
    assert silence_before_onset(np.concatenate([hiss, tone]), rate) == int(0.03 * rate)
    assert silence_before_onset(tone, rate) == 0
    assert silence_before_onset(hiss, rate) == 0  # nothing to start from: left as it is
    assert silence_before_onset(np.zeros(0, np.float32), rate) == 0


def audio_frame(pts: int | None, samples: int = 960, rate: int = 48000) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.int16), format="s16", layout="mono")
    frame.sample_rate = rate
    frame.pts = pts
    if pts is not None:
        frame.time_base = fractions.Fraction(1, rate)
    return frame


def test_capture_clock_places_late_frames_at_their_capture_time_across_a_timestamp_wrap():
    clock = CaptureClock()
    origin = (1 << 32) - 48000  # the RTP timestamp wraps one second in
    lateness = [0.01, 0.03, 0.4, 1.2, 2.5, 0.02]  # the network, a busy event loop catching up
    for index, late in enumerate(lateness):
        pts = (origin + index * 48000) % (1 << 32)
        captured = clock.captured_at(audio_frame(pts), arrival=100.0 + index + late)
        assert captured == pytest.approx(100.01 + index, abs=1e-3)


def test_capture_clock_follows_a_slightly_slow_sender_clock_and_frames_without_timestamps():
    clock = CaptureClock()
    drift = 50e-6  # the sender's audio clock runs 50 ppm slow
    for second in range(0, 3600, 60):
        arrival = 100.0 + second * (1 + drift)
        captured = clock.captured_at(audio_frame(second * 48000), arrival)
    assert captured == pytest.approx(arrival, abs=0.01)
    assert clock.captured_at(audio_frame(None), arrival=42.0) == 42.0

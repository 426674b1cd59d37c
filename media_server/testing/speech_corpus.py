"""Speech for tests and benchmarks, made on the spot: questions, espeak-ng voices, word error rate.

Nothing recorded is committed; every clip is synthesised when it is needed.
"""

from __future__ import annotations

import io
import re
import subprocess
import wave
from pathlib import Path

import numpy as np

from engines.audio import resample
from engines.lipsync.wav2lip.calibration import CALIBRATION_FRAMES, speech_mel_windows

QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "How many days are there in a week?",
    "What do bees make?",
    "What is the boiling point of water?",
    "Which animal is known as the king of the jungle?",
    "What is the opposite of hot?",
    "How many minutes are in an hour?",
    "What is the capital of Japan?",
    "What language do people speak in Spain?",
    "Which ocean is the biggest?",
    "What do cows drink?",
    "How many wheels does a bicycle have?",
    "What is the tallest mountain in the world?",
    "Can you recommend a good book?",
    "What is your favorite season?",
    "Where does the sun rise?",
    "What is two plus three?",
    "Why do leaves change color in autumn?",
)

# A learner's questions and sentences in German, chosen among those that Whisper base transcribes well
# when espeak-ng's German voice says them (its German is harder to recognise than a person's).
GERMAN_QUESTIONS = (
    "Was ist die Hauptstadt von Deutschland?",
    "Ich möchte einen Kaffee trinken.",
    "Kannst du mir helfen?",
    "Ich habe einen Hund.",
    "Ich heiße Anna und ich lerne Deutsch.",
    "Was ist die Hauptstadt von Frankreich?",
    "Wie viele Beine hat eine Spinne?",
    "Ich gehe morgen ins Kino.",
)
QUESTIONS_BY_LANGUAGE = {"en": QUESTIONS, "de": GERMAN_QUESTIONS}

# What the int8 Wav2Lip decoder is calibrated on (engines/lipsync/wav2lip/calibration_mels.npz).
CALIBRATION_SPEECH = (
    ("Hello! How can I help you today? The weather is lovely this morning.", "en-us", 165),
    ("Paris is the capital of France, and Rome is the capital of Italy.", "en-gb", 140),
    ("A spider has eight legs; bees make honey, and cows drink water.", "en-us", 190),
)


def espeak(text: str, voice: str = "en-us", words_per_minute: int = 160) -> tuple[np.ndarray, int]:
    """``text`` spoken by Debian's espeak-ng, as float32 mono and its sample rate."""
    wav_bytes = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(wav_bytes)) as reader:
        rate = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0, rate


def espeak_16k(sentences: tuple[tuple[str, str, int], ...]) -> list[np.ndarray]:
    """Each (text, voice, words per minute) spoken by espeak-ng, as float32 mono at 16 kHz."""
    return [resample(*espeak(text, voice, words_per_minute), 16000) for text, voice, words_per_minute in sentences]


def calibration_mels() -> np.ndarray:
    """The int8 Wav2Lip decoder's calibration speech: 64 mel windows spread over CALIBRATION_SPEECH.

    ``np.savez_compressed(CALIBRATION_MELS, mels=calibration_mels())`` writes the shipped file again."""
    mels = speech_mel_windows(espeak_16k(CALIBRATION_SPEECH))
    picks = np.linspace(0, len(mels) - 1, CALIBRATION_FRAMES).round().astype(int)
    return mels[picks]


# fmt: off
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
# fmt: on


def normalized_words(text: str) -> list[str]:
    """Lower case, no punctuation, small numbers as words: "2 plus 3" is not a mistake for "two plus three"."""
    words = re.sub(r"[^\w\s']", " ", text.lower()).split()
    return [NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(NUMBER_WORDS) else w for w in words]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words; case and punctuation do not count."""
    ref, hyp = normalized_words(reference), normalized_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i]
        for j, hyp_word in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1] / len(ref)


def write_wav(path: Path, audio: np.ndarray, rate: int) -> Path:
    """Float32 mono audio as a 16-bit WAV file (a fake microphone, or a recording to render)."""
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())
    return path

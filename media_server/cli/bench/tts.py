"""``facecast bench tts``: Piper speaking sentences in pieces (``tts.stream_sentences``) against whole.

Two copies of the configured Piper engine, one with each setting, speak the same reply sentences
(short first phrases as the chunker hands them over, and whole sentences) in turn, the first of them
alternating, for several rounds. Per copy: the median time from the request to the first audio and
to the sentence's last audio, and the real-time factor over everything spoken.
"""

from __future__ import annotations

import argparse
import statistics
import time

from engines.base import TTSEngine
from engines.registry import create_engine
from media_server.cli.bench.output import print_summary
from media_server.config import Settings

SENTENCES = (
    "The capital of France,",
    "A spider has eight legs.",
    "Jupiter is the largest planet,",
    "in our solar system.",
    "Water boils at one hundred degrees Celsius.",
    "The Pacific Ocean is the largest ocean on Earth.",
    "I'm not sure,",
    "but I think it was Shakespeare.",
    "Bees make honey from the nectar of flowers.",
    "The sun rises in the east and sets in the west.",
)
ROUNDS = 3
COPIES = {"pieces": True, "whole": False}


def speak(tts: TTSEngine, text: str) -> tuple[float, float, float]:
    """(seconds to the first audio, seconds to the last, seconds of audio)."""
    started = time.perf_counter()
    first: float | None = None
    audio_seconds = 0.0
    for chunk in tts.synthesize(text, tts.default_voice):
        if first is None:
            first = time.perf_counter() - started
        audio_seconds += len(chunk.audio) / chunk.sample_rate
    if first is None:
        raise RuntimeError(f"no audio for {text!r}")
    return first, time.perf_counter() - started, audio_seconds


def run(settings: Settings) -> dict[str, object]:
    if settings.tts.engine != "piper":
        raise SystemExit("bench tts compares Piper's stream_sentences settings: set tts.engine = 'piper'")
    engines = {
        name: create_engine("tts", "piper", {**settings.tts.options, "stream_sentences": streams})
        for name, streams in COPIES.items()
    }
    first: dict[str, list[float]] = {name: [] for name in COPIES}
    whole: dict[str, list[float]] = {name: [] for name in COPIES}
    spoken = {name: [0.0, 0.0] for name in COPIES}  # seconds of work, seconds of audio
    try:
        for tts in engines.values():
            tts.warm_up()
        for round_number in range(ROUNDS):
            for index, text in enumerate(SENTENCES):
                names = list(COPIES)
                if (round_number + index) % 2:
                    names.reverse()
                for name in names:
                    to_first, to_last, audio_seconds = speak(engines[name], text)
                    first[name].append(to_first)
                    whole[name].append(to_last)
                    spoken[name][0] += to_last
                    spoken[name][1] += audio_seconds
    finally:
        for tts in engines.values():
            tts.close()
    first_ms = {name: statistics.median(values) * 1000 for name, values in first.items()}
    whole_ms = {name: statistics.median(values) * 1000 for name, values in whole.items()}
    return {
        "sentences": len(SENTENCES) * ROUNDS,
        "first_audio_ms_p50": {name: round(ms, 1) for name, ms in first_ms.items()},
        "pieces_over_whole_first_audio": round(first_ms["pieces"] / first_ms["whole"], 2),
        "last_audio_ms_p50": {name: round(ms, 1) for name, ms in whole_ms.items()},
        "pieces_over_whole_last_audio": round(whole_ms["pieces"] / whole_ms["whole"], 2),
        "real_time_factor": {name: round(work / audio, 3) for name, (work, audio) in spoken.items()},
    }


def main(args: argparse.Namespace, settings: Settings) -> None:
    print_summary(run(settings), args.json)

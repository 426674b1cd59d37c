"""``facecast bench startup``: what the LLM's trial run (engines/llm/llama_cpp.py) adds to loading it.

The configured llama-cpp engine is loaded ``ROUNDS`` times with its trial runs forgotten (a first start
on a new machine or llama.cpp build) and as many times with them remembered (every later start), in
alternating order. Medians of each and their difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

from media_server.cli.bench.output import print_summary
from media_server.config import Settings

ROUNDS = 5


def run(settings: Settings) -> dict[str, object]:
    # Only llama-cpp has a trial run; its cache is where the passes are remembered.
    from engines.llm.llama_cpp import LlamaCppLLM, cache_directory

    if settings.llm.engine != "llama-cpp":
        raise SystemExit("bench startup measures the llama-cpp engine's trial run: set llm.engine = 'llama-cpp'")
    engine_settings = LlamaCppLLM.Settings.model_validate(settings.llm.options)
    LlamaCppLLM(engine_settings).close()  # assembles and derives the models once, outside the timings
    seconds: dict[str, list[float]] = {"trial run": [], "trial remembered": []}
    for round_number in range(ROUNDS):
        names = list(seconds)
        if round_number % 2:
            names.reverse()
        for name in names:
            if name == "trial run":
                for marker in cache_directory(engine_settings).glob("*.trial-passed-*"):
                    marker.unlink()
            started = time.perf_counter()
            LlamaCppLLM(engine_settings).close()
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "rounds": ROUNDS,
        "llm_load_s_p50": {name: round(value, 2) for name, value in medians.items()},
        "trial_run_adds_s": round(medians["trial run"] - medians["trial remembered"], 2),
    }


def main(args: argparse.Namespace, settings: Settings) -> None:
    print_summary(run(settings), args.json)

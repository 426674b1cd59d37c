"""``facecast bench llm``: the configured LLM with its English-output vocabulary against the full one.

Both copies of the model are loaded and answer the corpus questions in turn, question by question, so
a change in machine load hits both alike. Per copy: the median time to the first delta (the question
evaluated after the persona's prepared preamble, as in a session) and per later delta, the copy's
vocabulary size, and whether the two wrote the same replies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from engines.base import ChatMessage, LLMEngine, Persona
from engines.registry import create_engine
from media_server.config import Settings
from media_server.runtime import personas_from
from media_server.speech_corpus import QUESTIONS

VOCABULARIES = ("english", "full")
ROUNDS = 2


def _timed_reply(llm: LLMEngine, persona: Persona, question: str) -> tuple[str, float, list[float]]:
    """(reply, ms to the first delta, ms between later deltas)."""
    started = time.perf_counter()
    arrivals, deltas = [], []
    for delta in llm.stream_reply(persona, [ChatMessage("user", question)], lambda: False):
        arrivals.append(time.perf_counter())
        deltas.append(delta)
    first = (arrivals[0] - started) * 1000
    return "".join(deltas), first, [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]


def run(settings: Settings) -> dict[str, object]:
    persona = personas_from(settings)[settings.server.default_persona]
    engines = {
        name: create_engine("llm", settings.llm.engine, {**settings.llm.options, "vocabulary": name})
        for name in VOCABULARIES
    }
    first: dict[str, list[float]] = {name: [] for name in VOCABULARIES}
    later: dict[str, list[float]] = {name: [] for name in VOCABULARIES}
    replies: dict[str, list[str]] = {name: [] for name in VOCABULARIES}
    try:
        for llm in engines.values():
            llm.warm_up()
        for _ in range(ROUNDS):
            for question in QUESTIONS:
                for name, llm in engines.items():
                    llm.prepare(persona)
                    reply, first_ms, gaps = _timed_reply(llm, persona, question)
                    first[name].append(first_ms)
                    later[name].extend(gaps)
                    replies[name].append(reply)
        descriptions = {name: llm.describe() for name, llm in engines.items()}
    finally:
        for llm in engines.values():
            llm.close()
    per_delta = {name: statistics.median(later[name]) for name in VOCABULARIES}
    return {
        "questions": len(QUESTIONS) * ROUNDS,
        "first_delta_ms_p50": {name: round(statistics.median(first[name]), 1) for name in VOCABULARIES},
        "later_delta_ms_p50": {name: round(per_delta[name], 1) for name in VOCABULARIES},
        "english_over_full_per_delta": round(per_delta["english"] / per_delta["full"], 2),
        "same_replies": sum(a == b for a, b in zip(replies["english"], replies["full"])),
        "vocabulary": {name: descriptions[name]["vocabulary"] for name in VOCABULARIES},
    }


def main(args: argparse.Namespace, settings: Settings) -> None:
    summary = run(settings)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        print(f"{key}: {value}")

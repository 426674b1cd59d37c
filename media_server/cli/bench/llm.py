"""``facecast bench llm``: two comparisons of the configured LLM, each between copies loaded side
by side and asked in turn, so that a change in machine load hits them alike.

- Vocabulary: the common-English and English-output vocabularies against the full one (three copies),
  on the corpus questions. Per copy: the median time to the first delta (the question evaluated after
  the persona's prepared preamble, as in a session) and per later delta, its ratio to the full copy's,
  the copy's vocabulary size, and how many of its replies are the full copy's.
- History: one long conversation of typed questions, each asked as soon as the last reply ended (no
  quiet moment to prepare the next prompt in), with the kept history moved in the KV cache when old
  exchanges are dropped, against read again. Per copy: the time to the first delta over the first and
  the last turns, and the slowest turn (one that drops exchanges).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from engines.base import ChatMessage, LLMEngine, Persona
from engines.registry import create_engine
from media_server.cli.bench.output import print_summary
from media_server.config import Settings
from media_server.runtime import personas_from
from media_server.testing.speech_corpus import QUESTIONS

VOCABULARIES = ("common-english", "english", "full")
ROUNDS = 2
HISTORY_MODES = {"moved": True, "read_again": False}  # llm option move_kept_history
CONVERSATION_TURNS = 50
EDGE_TURNS = 5


def _timed_reply(
    llm: LLMEngine, persona: Persona, question: str, history: list[ChatMessage] | None = None
) -> tuple[str, float, list[float]]:
    """(reply, ms to the first delta, ms between later deltas)."""
    started = time.perf_counter()
    arrivals, deltas = [], []
    for delta in llm.stream_reply(persona, [*(history or []), ChatMessage("user", question)], lambda: False):
        arrivals.append(time.perf_counter())
        deltas.append(delta)
    first = (arrivals[0] - started) * 1000
    return "".join(deltas), first, [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]


def _vocabularies(settings: Settings) -> dict[str, object]:
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
        "per_delta_over_full": {name: round(per_delta[name] / per_delta["full"], 2) for name in VOCABULARIES},
        "same_replies_as_full": {
            name: sum(a == b for a, b in zip(replies[name], replies["full"])) for name in VOCABULARIES
        },
        "vocabulary": {name: descriptions[name]["vocabulary"] for name in VOCABULARIES},
    }


def _history(settings: Settings) -> dict[str, object]:
    persona = personas_from(settings)[settings.server.default_persona]
    engines = {
        name: create_engine("llm", settings.llm.engine, {**settings.llm.options, "move_kept_history": moved})
        for name, moved in HISTORY_MODES.items()
    }
    histories: dict[str, list[ChatMessage]] = {name: [] for name in engines}
    first: dict[str, list[float]] = {name: [] for name in engines}
    try:
        for llm in engines.values():
            llm.warm_up()
            llm.prepare(persona)
        for turn in range(CONVERSATION_TURNS):
            question = f"{QUESTIONS[turn % len(QUESTIONS)]} (question {turn + 1})"
            for name, llm in engines.items():
                reply, first_ms, _ = _timed_reply(llm, persona, question, histories[name])
                histories[name] += [ChatMessage("user", question), ChatMessage("assistant", reply)]
                first[name].append(first_ms)
    finally:
        for llm in engines.values():
            llm.close()
    return {
        name: {
            "first_delta_ms_first_turns_p50": round(statistics.median(times[:EDGE_TURNS]), 1),
            "first_delta_ms_last_turns_p50": round(statistics.median(times[-EDGE_TURNS:]), 1),
            "first_delta_ms_max": round(max(times), 1),
            "first_delta_ms": [round(ms) for ms in times],
        }
        for name, times in first.items()
    }


def run(settings: Settings) -> dict[str, object]:
    return {"vocabulary": _vocabularies(settings), "history": _history(settings)}


def main(args: argparse.Namespace, settings: Settings) -> None:
    print_summary(run(settings), args.json, sections=True)

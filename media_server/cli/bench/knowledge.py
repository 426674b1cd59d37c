"""``facecast bench knowledge``: retrieval from a 1,000-page handbook the benchmark writes itself.

The handbook (media_server/testing/knowledge_corpus.py) is 10 PDFs of 60 pages and 8 Markdown files of 50
sections (a section counts as a page), in a temporary folder, indexed into a fresh base with the
configured embedding model and passage settings. Two question sets: questions on facts that hang on
a made-up name, and everyday policies asked about in other words than they are written in. Reported:
the share of questions whose answering passage (right document, containing the answer) is in the top
three, for full-text search alone, vectors alone and the two fused; ingest pages and passages per
second; fused search latency p50/p95 (the question's embedding included); and how the relevance
threshold splits the answerable questions from general-knowledge ones (media_server/testing/speech_corpus.py)
that the handbook does not answer: the share of each left with a source.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from engines.knowledge import KnowledgeBase, Passage, embedder_for
from media_server.cli.bench.output import print_summary
from media_server.config import Settings
from media_server.conversation.knowledge import knowledge_options
from media_server.testing.knowledge_corpus import POLICIES, PlacedFact, write_handbook
from media_server.testing.speech_corpus import QUESTIONS

PDF_FILES, PAGES_PER_PDF = 10, 60
MARKDOWN_FILES, SECTIONS_PER_MARKDOWN = 8, 50
NAMED_QUESTIONS = 300
TOP = 3
MODES = ("text", "vector", "fused")


def _answers(placed: PlacedFact, passages: list[Passage]) -> bool:
    return any(p.document == placed.document and placed.fact.answer in p.text for p in passages[:TOP])


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run(settings: Settings) -> dict[str, object]:
    embedder = embedder_for(settings.knowledge.model, settings.knowledge.min_relevance)
    with tempfile.TemporaryDirectory(prefix="facecast-bench-knowledge-") as folder:
        files, placed = write_handbook(Path(folder), PDF_FILES, PAGES_PER_PDF, MARKDOWN_FILES, SECTIONS_PER_MARKDOWN)
        base = KnowledgeBase.open(Path(folder) / "bench.sqlite", embedder, knowledge_options(settings.knowledge))
        started = time.perf_counter()
        report = base.add(files)
        ingest_s = time.perf_counter() - started
        passages = sum(info.passages for info in report.added)
        named = random.Random(1).sample([p for p in placed if p.fact not in POLICIES], NAMED_QUESTIONS)
        question_sets = {"named": named, "policy": [p for p in placed if p.fact in POLICIES]}
        hit_rate: dict[str, dict[str, float]] = {}
        latencies_ms: list[float] = []
        best_relevance: list[float] = []
        answered = 0
        embedder.warm_up()
        base.search("warm-up question", TOP)
        for set_name, questions in question_sets.items():
            hits = dict.fromkeys(MODES, 0)
            for placed_fact in questions:
                for mode in MODES:
                    started = time.perf_counter()
                    found = base.search(placed_fact.fact.question, TOP, mode=mode, min_relevance=-1.0)
                    if mode == "fused":
                        latencies_ms.append((time.perf_counter() - started) * 1000)
                        best_relevance.append(max(p.relevance for p in found))
                    hits[mode] += _answers(placed_fact, found)
                answered += bool(base.search(placed_fact.fact.question, TOP))  # with the relevance threshold
            hit_rate[set_name] = {mode: round(hits[mode] / len(questions), 3) for mode in MODES}
        unanswered = sum(not base.search(question, TOP) for question in QUESTIONS)
        unanswerable_relevance = [max(p.relevance for p in base.search(q, TOP, min_relevance=-1.0)) for q in QUESTIONS]
        base.close()
    pages = PDF_FILES * PAGES_PER_PDF + MARKDOWN_FILES * SECTIONS_PER_MARKDOWN
    return {
        "model": embedder.model_id,
        "pages": pages,
        "passages": passages,
        "questions": {name: len(questions) for name, questions in question_sets.items()},
        f"hit_rate_top{TOP}": hit_rate,
        "ingest_s": round(ingest_s, 1),
        "ingest_pages_per_s": round(pages / ingest_s, 1),
        "ingest_passages_per_s": round(passages / ingest_s, 1),
        "search_ms_p50": round(statistics.median(latencies_ms), 1),
        "search_ms_p95": round(_percentile(latencies_ms, 0.95), 1),
        "load_average_1min": round(os.getloadavg()[0], 2),  # how busy the cores were (this benchmark included)
        "relevance_threshold": embedder.relevance_threshold,
        "best_relevance_p50": {
            "answerable": round(statistics.median(best_relevance), 3),
            "unanswerable": round(statistics.median(unanswerable_relevance), 3),
        },
        "answerable_with_a_source": round(answered / len(best_relevance), 3),
        "unanswerable_with_no_source": round(unanswered / len(QUESTIONS), 3),
    }


def main(args: argparse.Namespace, settings: Settings) -> None:
    print_summary(run(settings), args.json)

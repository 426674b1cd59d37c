"""What a search returns, and how passages go into an LLM prompt within a token budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Passage:
    document: str  # the document's name (its file name)
    page: int | None  # 1-based page of a PDF
    section: str | None  # the headings above the passage ("Returns > Refunds") in Markdown and HTML
    text: str
    snippet: str  # a short excerpt around the question's words, for showing the source
    score: float  # the fused rank score the results are ordered by (reciprocal rank fusion)
    relevance: float  # cosine similarity of question and passage: what the "no source" threshold compares

    @property
    def location(self) -> str:
        """Where in the document: "page 3", the section's headings, or "" for plain text."""
        if self.page is not None:
            return f"page {self.page}"
        return self.section or ""

    @property
    def source(self) -> str:
        """The document and location, e.g. "handbook.pdf, page 3"."""
        return f"{self.document}, {self.location}" if self.location else self.document


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate of LLM tokens: about four characters per token in English and German."""
    return math.ceil(len(text) / 4)


def prompt_entries(
    passages: Sequence[Passage], max_tokens: int, count_tokens: Callable[[str], int] = estimate_tokens
) -> list[tuple[Passage, str]]:
    """(passage, its entry: rank number, source and text) for as many of the best passages as fit in
    ``max_tokens``, best first. A first passage that alone is over the budget is cut, at a word, to fit."""
    entries: list[tuple[Passage, str]] = []
    used = 0
    for number, passage in enumerate(passages, start=1):
        entry = f"[{number}] {passage.source}\n{passage.text}"
        cost = count_tokens(entry) + (count_tokens("\n\n") if entries else 0)
        if used + cost > max_tokens:
            if not entries and (cut := _cut_to_budget(entry, max_tokens, count_tokens)):
                entries.append((passage, cut))
            break
        entries.append((passage, entry))
        used += cost
    return entries


def prompt_block(
    passages: Sequence[Passage],
    max_tokens: int,
    count_tokens: Callable[[str], int] = estimate_tokens,
    *,
    best_last: bool = False,
) -> str:
    """The passages that fit in ``max_tokens`` (``prompt_entries``) as one text: best first, or with
    ``best_last`` best last (nearest the question after them: small models answer most readily from
    what they read last). Pass the LLM's own token counter as ``count_tokens`` for an exact budget;
    "" when there is nothing to cite.
    """
    entries = [entry for _, entry in prompt_entries(passages, max_tokens, count_tokens)]
    return "\n\n".join(reversed(entries) if best_last else entries)


def _cut_to_budget(entry: str, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    words = entry.split(" ")
    low, high = 0, len(words)
    while low < high:  # the most words whose text fits
        middle = (low + high + 1) // 2
        if count_tokens(" ".join(words[:middle]) + " …") <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low]) + " …" if low else ""

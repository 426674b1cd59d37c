"""Passages from blocks of text: whole sentences up to a target number of words, overlapping a little.

A passage never cuts a sentence, unless that sentence alone is longer than the target (it is then
cut into pieces of the target length). Consecutive passages of a block share their last/first
sentences, up to the overlap, so a fact that straddles two passages is whole in one of them.
Passages never span blocks: each keeps its block's page or section.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from engines.knowledge.extract import Block

# A candidate sentence end: terminal punctuation, closing quotes or brackets, then white space.
SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*\s+")
# Words whose full stop does not end a sentence (lower-case, without the final dot).
ABBREVIATIONS = frozenset(
    ("mr", "mrs", "ms", "dr", "prof", "st", "no", "nr", "vs", "etc", "e.g", "i.e", "z.b", "bzw", "ca", "inc", "ltd",
     "co", "jr", "sr", "fig", "approx", "dept", "tel", "ext", "vol", "art", "abs", "u.a", "d.h", "usw", "ggf", "evtl")
)  # fmt: skip


@dataclass(frozen=True)
class Chunk:
    text: str
    page: int | None
    section: str | None


def split_sentences(paragraph: str) -> list[str]:
    """The sentences of one paragraph: a break after . ! ? or … where the next word starts a sentence."""
    sentences = []
    start = 0
    for match in SENTENCE_END.finditer(paragraph):
        following = paragraph[match.end() : match.end() + 2].lstrip("\"'“‘([")
        if not following or not (following[0].isupper() or following[0].isdigit()):
            continue
        if match.group().startswith(".") and _ends_with_abbreviation(paragraph[start : match.start()]):
            continue
        sentences.append(paragraph[start : match.end()].strip())
        start = match.end()
    sentences.append(paragraph[start:].strip())
    return [sentence for sentence in sentences if sentence]


def _ends_with_abbreviation(text: str) -> bool:
    words = text.split()
    if not words:
        return False
    word = words[-1].lstrip("(\"'")
    return word.lower() in ABBREVIATIONS or (len(word) == 1 and word.isupper())  # an initial: "J. Smith"


def _sentence_words(text: str, target_words: int) -> list[list[str]]:
    """Every sentence of ``text`` as its words; a sentence over ``target_words`` becomes several pieces."""
    units = []
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in split_sentences(" ".join(paragraph.split())):
            words = sentence.split()
            units.extend(words[start : start + target_words] for start in range(0, len(words), target_words))
    return units


def chunk_text(text: str, target_words: int, overlap_words: int) -> list[str]:
    """Whole sentences packed into passages of at most ``target_words`` words, overlapping by up to ``overlap_words``."""
    passages: list[list[list[str]]] = []
    current: list[list[str]] = []
    count = 0
    for sentence in _sentence_words(text, target_words):
        if current and count + len(sentence) > target_words:
            passages.append(current)
            current, count = _overlap(current, overlap_words)
            if count + len(sentence) > target_words:
                current, count = [], 0
        current.append(sentence)
        count += len(sentence)
    if current:
        passages.append(current)
    return [" ".join(" ".join(sentence) for sentence in passage) for passage in passages]


def _overlap(passage: list[list[str]], overlap_words: int) -> tuple[list[list[str]], int]:
    """The last sentences of ``passage`` that fit in ``overlap_words``; never the whole passage."""
    kept: list[list[str]] = []
    count = 0
    for sentence in reversed(passage[1:]):
        if count + len(sentence) > overlap_words:
            break
        kept.insert(0, sentence)
        count += len(sentence)
    return kept, count


def chunk_blocks(blocks: Iterable[Block], target_words: int, overlap_words: int) -> list[Chunk]:
    return [
        Chunk(text, block.page, block.section)
        for block in blocks
        for text in chunk_text(block.text, target_words, overlap_words)
    ]

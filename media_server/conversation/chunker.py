"""Split a stream of LLM text into pieces for TTS: the first phrase early, then whole sentences.

The first chunk is on the critical path to the avatar's first word: it ends at the first clause
mark (or sentence end) once it has ``first_chunk_min_words`` words, or, when ``phrase_cut`` is on,
just before a word that opens a new phrase ("Jupiter is the largest planet | in our solar system"),
so the voice starts while the LLM is still writing the sentence.

A sentence is known to have ended without waiting for the next token when it ends in "!", "?" or
"…", or in "." after a lowercase word ("Paris." but not "3." or "U.S."): a small model's reply is
often one sentence, and the token after it (the newline that stops the model) would otherwise hold
the whole chunk back.
"""

from __future__ import annotations

import re

CLOSERS = r"[\"')\]”’]*"
SENTENCE_END = re.compile(rf"[.!?…]+{CLOSERS}(?=\s)")
# At the very end of the text so far: a boundary no later token can move.
SENTENCE_END_NOW = re.compile(rf"(?:[!?…]+|(?<![\w.])[A-Za-z]*[a-z]{{2}}\.){CLOSERS}$")
# Words whose "." does not end the sentence ("Dr. Smith").
ABBREVIATION = re.compile(
    r"(?<![\w.])(?:mr|mrs|ms|dr|prof|sr|jr|st|vs|etc|approx|incl|dept|fig|vol|e\.g|i\.e)\.$", re.IGNORECASE
)
CLAUSE_END = re.compile(r"[,;:—–]+(?=\s)")
WORD = re.compile(r"\S+(?=\s)")  # a word known to be complete: something follows it
# Prepositions, conjunctions and relative words a speaker naturally pauses before. "of" is left out:
# "the capital | of France" splits a noun phrase a listener hears as one.
OPENER_WORDS = (
    "in on at with without for from to into onto by about through during before after since until "
    "because although though while whereas unless if when where which who whose whom that than "
    "and but or so as like near under over between among around across along"
)
PHRASE_OPENERS = frozenset(OPENER_WORDS.split())


class SpeechChunker:
    """Feed text deltas in; get speakable chunks out as soon as a boundary is known."""

    def __init__(self, first_chunk_min_words: int = 3, phrase_cut: bool = True) -> None:
        self.first_chunk_min_words = first_chunk_min_words
        self.phrase_cut = phrase_cut
        self._pending = ""
        self._emitted_any = False

    def feed(self, delta: str) -> list[str]:
        self._pending += delta
        chunks = []
        while (chunk := self._take_chunk()) is not None:
            chunks.append(chunk)
        return chunks

    def flush(self) -> list[str]:
        rest, self._pending = self._pending.strip(), ""
        return [rest] if _speakable(rest) else []

    def _take_chunk(self) -> str | None:
        boundary = _sentence_end(self._pending)
        mid_sentence = False
        if not self._emitted_any:
            clause = _first_clause_end(self._pending, self.first_chunk_min_words)
            if clause is not None and (boundary is None or clause < boundary):
                boundary = clause
            phrase = _first_phrase_start(self._pending, self.first_chunk_min_words) if self.phrase_cut else None
            if phrase is not None and (boundary is None or phrase < boundary):
                boundary, mid_sentence = phrase, True
        if boundary is None:
            return None
        chunk, self._pending = self._pending[:boundary].strip(), self._pending[boundary:]
        if not _speakable(chunk):
            return None if not self._pending.strip() else self._take_chunk()
        self._emitted_any = True
        # A trailing comma makes the voice end the phrase with a continuation, not a sentence's fall.
        return f"{chunk}," if mid_sentence else chunk


def _sentence_end(text: str) -> int | None:
    for match in SENTENCE_END.finditer(text):
        if not ABBREVIATION.search(text, 0, match.end()):
            return match.end()
    match = SENTENCE_END_NOW.search(text)
    return match.end() if match and not ABBREVIATION.search(text, 0, match.end()) else None


def _first_clause_end(text: str, min_words: int) -> int | None:
    for match in CLAUSE_END.finditer(text):
        if len(text[: match.end()].split()) >= min_words:
            return match.end()
    return None


def _first_phrase_start(text: str, min_words: int) -> int | None:
    """Where the first complete phrase-opening word starts that has ``min_words`` words before it."""
    for index, match in enumerate(WORD.finditer(text)):
        if index >= min_words and match.group().lower() in PHRASE_OPENERS:
            return match.start()
    return None


def _speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)

"""Split a stream of LLM text into pieces for TTS: the first clause early, then whole sentences."""

from __future__ import annotations

import re

SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)")
CLAUSE_END = re.compile(r"[,;:—–]+(?=\s)")


class SpeechChunker:
    """Feed text deltas in; get speakable chunks out as soon as a boundary is known."""

    def __init__(self, first_chunk_min_words: int = 4) -> None:
        self.first_chunk_min_words = first_chunk_min_words
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
        boundary = _first_match_end(SENTENCE_END, self._pending)
        if not self._emitted_any:
            clause = _first_clause_end(self._pending, self.first_chunk_min_words)
            if clause is not None and (boundary is None or clause < boundary):
                boundary = clause
        if boundary is None:
            return None
        chunk, self._pending = self._pending[:boundary].strip(), self._pending[boundary:]
        if not _speakable(chunk):
            return None if not self._pending.strip() else self._take_chunk()
        self._emitted_any = True
        return chunk


def _first_match_end(pattern: re.Pattern[str], text: str) -> int | None:
    match = pattern.search(text)
    return match.end() if match else None


def _first_clause_end(text: str, min_words: int) -> int | None:
    for match in CLAUSE_END.finditer(text):
        if len(text[: match.end()].split()) >= min_words:
            return match.end()
    return None


def _speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)

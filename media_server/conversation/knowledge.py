"""The knowledge bases a server answers from (engines/knowledge): one library in ``knowledge.dir``, its
embedding model loaded once, at start-up when a persona answers from a base that exists, else with the
first document added to one.

A persona answers only from its bases (``PersonaProfile.knowledge_bases``); a base it was not given
is never searched for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from engines.knowledge import (
    DocumentBytes,
    DocumentInfo,
    IngestReport,
    KnowledgeLibrary,
    KnowledgeOptions,
    Passage,
    check_name,
    embedder_for,
    prompt_block,
    prompt_entries,
)
from media_server.config import KnowledgeSettings


def knowledge_options(settings: KnowledgeSettings) -> KnowledgeOptions:
    return KnowledgeOptions(
        chunk_words=settings.chunk_words,
        overlap_words=settings.overlap_words,
        max_file_bytes=int(settings.max_file_mb * 2**20),
    )


def open_library(settings: KnowledgeSettings, *, with_model: bool = True) -> KnowledgeLibrary:
    """The library of ``knowledge.dir``; ``with_model`` loads the embedding model (needed to add and search)."""
    embedder = embedder_for(settings.model, settings.min_relevance) if with_model else None
    return KnowledgeLibrary(settings.dir, embedder, knowledge_options(settings))


def prompt_context(passages: Sequence[Passage], settings: KnowledgeSettings) -> tuple[list[Passage], str]:
    """(the passages that fit in ``knowledge.max_prompt_tokens``, them as the LLM's context, the best
    nearest the question)."""
    used = [passage for passage, _ in prompt_entries(passages, settings.max_prompt_tokens)]
    return used, prompt_block(used, settings.max_prompt_tokens, best_last=True)


class Retriever(Protocol):
    """What a conversation asks of the knowledge bases."""

    def existing(self, bases: Sequence[str]) -> list[str]:
        """Those of ``bases`` that exist now (one may be added at any time: by an upload, or by the CLI)."""

    def search(self, bases: Sequence[str], question: str) -> list[Passage]:
        """The passages of ``bases`` relevant to ``question``, best first (blocking: run it in a thread)."""


class Knowledge:
    """The server's knowledge bases. Every method but ``bases_for`` and ``names`` may load the embedding
    model: call them in a thread. Searches and ingests may run in several threads at once."""

    def __init__(self, settings: KnowledgeSettings) -> None:
        self.settings = settings
        self._library: KnowledgeLibrary | None = None
        self._loading = threading.Lock()

    def library(self) -> KnowledgeLibrary:
        """The library with its embedding model, loaded and warmed up on first use."""
        with self._loading:
            if self._library is None:
                embedder = embedder_for(self.settings.model, self.settings.min_relevance)
                embedder.warm_up()
                self._library = KnowledgeLibrary(self.settings.dir, embedder, knowledge_options(self.settings))
            return self._library

    def names(self) -> list[str]:
        """The bases that exist now (one may be added at any time: by an upload, or by the CLI)."""
        return KnowledgeLibrary(self.settings.dir).names()

    def existing(self, bases: Sequence[str]) -> list[str]:
        names = set(self.names())
        return [name for name in bases if name in names]

    def search(self, bases: Sequence[str], question: str) -> list[Passage]:
        return self.library().search(bases, question, self.settings.top_k)

    def add(self, base: str, documents: Iterable[Path | DocumentBytes]) -> IngestReport:
        """Index ``documents`` into ``base`` (created if new), all or none."""
        return self.library().base(check_name(base), create=True).add(documents)

    def documents(self, base: str) -> list[DocumentInfo]:
        return self.library().base(check_name(base)).documents()

    def remove(self, base: str, document: str) -> None:
        self.library().base(check_name(base)).remove(document)

    def close(self) -> None:
        if self._library is not None:
            self._library.close()

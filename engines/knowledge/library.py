"""Named knowledge bases in one folder: ``NAME.sqlite`` each; personas that name none use ``default``."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path

from engines.knowledge.embedders import Embedder
from engines.knowledge.errors import KnowledgeError
from engines.knowledge.passages import Passage
from engines.knowledge.store import DEFAULT_OPTIONS, KnowledgeBase, KnowledgeOptions

DEFAULT_BASE = "default"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SUFFIX = ".sqlite"


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise KnowledgeError(
            f"knowledge base name {name!r}: use 1-64 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


class KnowledgeLibrary:
    """The knowledge bases in ``directory``, opened once each and shared by every thread."""

    def __init__(
        self, directory: Path, embedder: Embedder | None = None, options: KnowledgeOptions = DEFAULT_OPTIONS
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.embedder = embedder
        self.options = options
        self._bases: dict[str, KnowledgeBase] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The bases that exist, sorted."""
        if not self.directory.is_dir():
            return []
        return sorted(path.stem for path in self.directory.glob(f"*{SUFFIX}") if NAME_PATTERN.fullmatch(path.stem))

    def base(self, name: str, *, create: bool = False) -> KnowledgeBase:
        """The base called ``name``; KnowledgeError if it does not exist and ``create`` is False."""
        check_name(name)
        with self._lock:
            if name not in self._bases:
                path = self.directory / f"{name}{SUFFIX}"
                self._bases[name] = KnowledgeBase.open(path, self.embedder, self.options, create=create)
            return self._bases[name]

    def search(
        self, names: Sequence[str], question: str, k: int = 3, *, min_relevance: float | None = None
    ) -> list[Passage]:
        """The best ``k`` passages of several bases together (a persona's ``knowledge`` list); missing bases are an error."""
        found = [
            passage for name in names for passage in self.base(name).search(question, k, min_relevance=min_relevance)
        ]
        return sorted(found, key=lambda passage: (-passage.score, -passage.relevance))[:k]

    def close(self) -> None:
        with self._lock:
            for base in self._bases.values():
                base.close()
            self._bases.clear()

"""A knowledge base: one SQLite file of documents, their passages, a full-text index and the passages' vectors.

Search fuses two rankings of the passages by reciprocal rank fusion: full-text (FTS5, bm25) and
cosine similarity to the question (brute force over a normalised matrix held in memory, reloaded
when another connection or process has changed the base). Ingest is one transaction: extraction
and embedding happen first, and a bad file or a crash leaves the base as it was. The base records
the embedding model that built it and refuses vectors of another.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from engines.knowledge.chunking import Chunk, chunk_blocks
from engines.knowledge.embedders import Embedder
from engines.knowledge.errors import DocumentError, KnowledgeError, ModelMismatchError
from engines.knowledge.extract import DocumentBytes, ExtractedDocument, extract, read_source
from engines.knowledge.passages import Passage

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    pages INTEGER,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    document_id INTEGER NOT NULL REFERENCES documents(id),
    page INTEGER,
    section TEXT,
    text TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, section, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS chunks_indexed AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text, section) VALUES (new.id, new.text, new.section);
END;
CREATE TRIGGER IF NOT EXISTS chunks_unindexed AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text, section) VALUES ('delete', old.id, old.text, old.section);
END;
"""
# Reciprocal rank fusion: a passage scores the sum of 1 / (RRF_K + rank) over the rankings. The usual
# constant, 60, flattens the top ranks so much that middling passages found by both methods push out
# the one passage a single method ranks first; with few passages shown, each method's best must stay in.
RRF_K = 2
MIN_CANDIDATES = 50  # passages taken from each ranking before fusing
# Before fusing, each ranking keeps only the passages close to its own best: a full-text hit whose bm25
# is at least TEXT_KEEP of the best one's, a vector hit whose cosine is within VECTOR_KEEP of the best.
# A question that one method answers decisively (a rare name, bm25 far ahead) then keeps that answer in
# the top passages, instead of losing it to middling passages both methods list somewhere (measured
# with facecast bench knowledge).
TEXT_KEEP = 0.5
VECTOR_KEEP = 0.1
# Words that say nothing about what is asked: left out of full-text queries, where they would match
# nearly every passage (English and German; bm25 alone still weighs other languages' common words down).
STOPWORDS = frozenset(
    (
        "a", "an", "the", "and", "or", "of", "to", "in", "on", "at", "for", "with", "by", "from", "is", "are", "was",
        "were", "be", "been", "am", "do", "does", "did", "can", "could", "may", "might", "must", "shall", "should",
        "will", "would", "i", "me", "my", "we", "our", "you", "your", "he", "she", "it", "its", "they", "them", "their",
        "this", "that", "these", "those", "what", "which", "who", "whom", "when", "where", "why", "how", "there",
        "here", "if", "not", "no", "any", "some", "much", "many", "more", "most", "than", "then", "so", "as", "about",
        "into", "over", "under", "up", "down", "out", "off", "each", "every", "all", "other", "such", "only", "very",
        "just", "also", "get", "got", "have", "has", "had", "der", "die", "das", "den", "dem", "des", "ein", "eine",
        "einen", "einem", "einer", "und", "oder", "zu", "im", "am", "um", "für", "mit", "von", "bei", "aus", "ist",
        "sind", "war", "waren", "bin", "bist", "sein", "wird", "werden", "kann", "können", "darf", "muss", "soll",
        "ich", "mich", "mir", "wir", "uns", "du", "dich", "dir", "er", "sie", "es", "ihr", "ihre", "was", "wer", "wie",
        "wo", "wann", "warum", "welche", "welcher", "welches", "wieviel", "viele", "nicht", "kein", "keine", "auch",
        "noch", "nur", "schon",
    )
)  # fmt: skip
EMBED_BATCH = 64  # passages embedded between two progress reports
SNIPPET_WORDS = 30
SearchMode = Literal["fused", "text", "vector"]


@dataclass(frozen=True)
class KnowledgeOptions:
    # A passage's target length: one vector stands for it, and a long passage dilutes the sentence that
    # answers among the others (all-MiniLM-L6-v2 reads at most 256 word pieces anyway).
    chunk_words: int = 60
    overlap_words: int = 15
    max_file_bytes: int = 50 * 2**20


DEFAULT_OPTIONS = KnowledgeOptions()


@dataclass(frozen=True)
class DocumentInfo:
    name: str
    kind: str  # pdf, markdown, html or text
    pages: int | None
    passages: int
    size_bytes: int
    sha256: str
    added_at: float  # Unix time


@dataclass(frozen=True)
class IngestReport:
    added: tuple[DocumentInfo, ...]
    replaced: tuple[str, ...]  # names of documents that existed and were replaced
    warnings: tuple[str, ...]  # e.g. pages without a text layer that were skipped
    seconds: float


@dataclass(frozen=True)
class _VectorIndex:
    generation: int
    model: str | None  # the model that made the vectors; None while the base is empty
    ids: np.ndarray  # chunk ids, in the matrix's row order
    rows: dict[int, int]  # chunk id: its row
    matrix: np.ndarray  # (passages, dimension) float32, unit rows


def _embedding_text(chunk: Chunk) -> str:
    # A section's headings say what its passages are about ("Returns > Refunds"): embed them too.
    return f"{chunk.section}\n{chunk.text}" if chunk.section else chunk.text


def _text_query(question: str) -> str:
    """The question as an FTS5 query matching any of its words but stopwords (bm25 weighs rare words up)."""
    words = dict.fromkeys(word for word in re.findall(r"\w+", question.lower()) if word not in STOPWORDS)
    return " OR ".join(f'"{word}"' for word in words)


def _snippet(text: str, question: str) -> str:
    """About SNIPPET_WORDS words of ``text`` starting a little before the first longer word of the question."""
    words = text.split()
    wanted = {word for word in re.findall(r"\w+", question.lower()) if len(word) > 3}
    first = next((i for i, word in enumerate(words) if re.sub(r"\W", "", word.lower()) in wanted), 0)
    start = max(0, min(first - 5, len(words) - SNIPPET_WORDS))
    excerpt = " ".join(words[start : start + SNIPPET_WORDS])
    return ("… " if start else "") + excerpt + (" …" if start + SNIPPET_WORDS < len(words) else "")


def _prepare(connection: sqlite3.Connection, path: Path) -> None:
    """Create the schema in a new file; refuse a file that is not a knowledge base of this schema."""
    try:
        connection.execute("PRAGMA journal_mode=WAL")  # searches go on while another process writes
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            connection.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    except sqlite3.DatabaseError as error:
        raise KnowledgeError(f"{path} is not a Facecast knowledge base ({error})") from error
    if version not in (0, int(SCHEMA_VERSION)):
        raise KnowledgeError(f"{path} is a knowledge base of another Facecast version (schema {version})")


class KnowledgeBase:
    """One knowledge base file. Searches may run from several threads at once; writes are serialised."""

    def __init__(
        self, path: Path, connection: sqlite3.Connection, embedder: Embedder | None, options: KnowledgeOptions
    ):
        self.path = path
        self.name = path.stem
        self.embedder = embedder
        self.options = options
        self._connection = connection
        self._lock = threading.RLock()
        self._index: _VectorIndex | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        embedder: Embedder | None = None,
        options: KnowledgeOptions = DEFAULT_OPTIONS,
        *,
        create: bool = True,
    ) -> KnowledgeBase:
        """Open (or create) the base at ``path``. Without an embedder it can list and remove, not add or search."""
        path = Path(path)
        if not path.exists() and not create:
            raise KnowledgeError(f"knowledge base {path.stem!r} does not exist ({path}); add documents to create it")
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            _prepare(connection, path)
        except BaseException:
            connection.close()
            raise
        return cls(path, connection, embedder, options)

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    # --- reading -----------------------------------------------------------

    @property
    def model_id(self) -> str | None:
        """The embedding model whose vectors the base holds (None while it is empty)."""
        with self._lock:
            return self._meta("model") if self._connection.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() else None

    def documents(self) -> list[DocumentInfo]:
        with self._lock:
            rows = self._connection.execute(
                "SELECT d.name, d.kind, d.pages, count(c.id), d.size_bytes, d.sha256, d.added_at"
                " FROM documents d LEFT JOIN chunks c ON c.document_id = d.id GROUP BY d.id ORDER BY d.name"
            ).fetchall()
        return [DocumentInfo(*row) for row in rows]

    def search(
        self, question: str, k: int = 3, *, mode: SearchMode = "fused", min_relevance: float | None = None
    ) -> list[Passage]:
        """The best ``k`` passages for ``question``, best first.

        ``mode`` "text" or "vector" ranks by one method alone (for comparison). Passages whose cosine
        similarity to the question is under ``min_relevance`` (default: the embedder's threshold) are
        left out, so an empty list means the documents hold nothing on the question.
        """
        embedder = self._require_embedder()
        index = self._current_index()
        self._check_model(index.model, embedder)
        if not question.strip() or not len(index.ids):
            return []
        # Not `matrix @ vector`: that wakes a multi-threaded BLAS whose spinning threads then fight the
        # embedding model's own for the cores, which made searches several times slower on two cores.
        similarities = np.einsum("ij,j->i", index.matrix, embedder.embed([question])[0])
        candidates = max(MIN_CANDIDATES, k)
        text = self._text_ranking(question, candidates) if mode != "vector" else []
        text = [(chunk_id, score) for chunk_id, score in text if chunk_id in index.rows]  # not added since loading
        vector = self._vector_ranking(index, similarities, candidates) if mode != "text" else []
        if mode == "fused":
            text = [(chunk_id, score) for chunk_id, score in text if score >= TEXT_KEEP * text[0][1]]
            vector = [(chunk_id, score) for chunk_id, score in vector if score >= vector[0][1] - VECTOR_KEEP]
        scores: dict[int, float] = {}
        for ranking in (text, vector):
            for rank, (chunk_id, _) in enumerate(ranking):
                scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank + 1)
        relevance = {chunk_id: float(similarities[index.rows[chunk_id]]) for chunk_id in scores}
        threshold = embedder.relevance_threshold if min_relevance is None else min_relevance
        chosen = [chunk_id for chunk_id in sorted(scores, key=lambda c: -scores[c]) if relevance[chunk_id] >= threshold]
        return self._passages(chosen[:k], question, scores, relevance)

    def _vector_ranking(self, index: _VectorIndex, similarities: np.ndarray, count: int) -> list[tuple[int, float]]:
        """(passage id, cosine similarity), most similar first."""
        count = min(count, len(similarities))
        top = np.argpartition(-similarities, count - 1)[:count]
        top = top[np.argsort(-similarities[top])]
        return list(zip(index.ids[top].tolist(), similarities[top].tolist()))

    def _text_ranking(self, question: str, count: int) -> list[tuple[int, float]]:
        """(passage id, bm25 score, higher is better), best first."""
        query = _text_query(question)
        if not query:
            return []
        with self._lock:
            return self._connection.execute(
                "SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?",
                (query, count),
            ).fetchall()

    def _passages(
        self, chunk_ids: list[int], question: str, scores: dict[int, float], relevance: dict[int, float]
    ) -> list[Passage]:
        if not chunk_ids:
            return []
        with self._lock:
            rows = self._connection.execute(
                "SELECT c.id, d.name, c.page, c.section, c.text FROM chunks c JOIN documents d ON d.id = c.document_id"
                f" WHERE c.id IN ({','.join('?' * len(chunk_ids))})",
                chunk_ids,
            ).fetchall()
        found = {row[0]: row for row in rows}
        return [
            Passage(
                document=found[chunk_id][1],
                page=found[chunk_id][2],
                section=found[chunk_id][3],
                text=found[chunk_id][4],
                snippet=_snippet(found[chunk_id][4], question),
                score=scores[chunk_id],
                relevance=relevance[chunk_id],
            )
            for chunk_id in chunk_ids
            if chunk_id in found  # a concurrent removal may have taken it since the index was read
        ]

    def _current_index(self) -> _VectorIndex:
        with self._lock:
            generation = int(self._meta("generation") or 0)
            if self._index is None or self._index.generation != generation:
                rows = self._connection.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
                ids = np.array([row[0] for row in rows], dtype=np.int64)
                matrix = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32)
                matrix = matrix.reshape(len(rows), len(rows[0][1]) // 4 if rows else 0)
                model = self._meta("model") if rows else None
                self._index = _VectorIndex(generation, model, ids, {int(i): n for n, i in enumerate(ids)}, matrix)
            return self._index

    # --- writing -----------------------------------------------------------

    def add(
        self, sources: Iterable[Path | DocumentBytes], progress: Callable[[int, int], None] | None = None
    ) -> IngestReport:
        """Index every document, or none: DocumentError (naming the file) leaves the base as it was.

        A document whose name is already in the base replaces it. ``progress(done, total)`` is
        called as passages are embedded.
        """
        embedder = self._require_embedder()
        started = time.monotonic()
        documents = [extract(read_source(source, self.options.max_file_bytes)) for source in sources]
        names = [document.name for document in documents]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise DocumentError(f"{', '.join(duplicates)} given twice: document names must be unique in a batch")
        chunks = [
            chunk_blocks(document.blocks, self.options.chunk_words, self.options.overlap_words)
            for document in documents
        ]
        vectors = self._embed(
            [_embedding_text(chunk) for document_chunks in chunks for chunk in document_chunks], progress
        )
        replaced = []
        with self._transaction():
            self._adopt_model(embedder)
            offset = 0
            for document, document_chunks in zip(documents, chunks):
                if self._delete_document(document.name):
                    replaced.append(document.name)
                self._insert_document(document, document_chunks, vectors[offset : offset + len(document_chunks)])
                offset += len(document_chunks)
        added_names = set(names)
        return IngestReport(
            added=tuple(info for info in self.documents() if info.name in added_names),
            replaced=tuple(replaced),
            warnings=tuple(warning for document in documents for warning in document.warnings),
            seconds=time.monotonic() - started,
        )

    def remove(self, name: str) -> None:
        """Remove one document and its passages; KnowledgeError if the base holds none of that name."""
        with self._transaction():
            if not self._delete_document(name):
                names = ", ".join(info.name for info in self.documents()) or "no documents"
                raise KnowledgeError(f"knowledge base {self.name!r} has no document {name!r}; it holds: {names}")

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Embed every passage again with this base's embedder (after changing models); returns the passage count."""
        embedder = self._require_embedder()
        with self._lock:
            rows = self._connection.execute("SELECT id, page, section, text FROM chunks ORDER BY id").fetchall()
        vectors = self._embed(
            [_embedding_text(Chunk(text, page, section)) for _, page, section, text in rows], progress
        )
        with self._transaction():
            self._connection.executemany(
                "UPDATE chunks SET vector = ? WHERE id = ?",
                ((vector.tobytes(), row[0]) for row, vector in zip(rows, vectors)),
            )
            self._set_meta("model", embedder.model_id)
        return len(rows)

    def _embed(self, texts: Sequence[str], progress: Callable[[int, int], None] | None) -> np.ndarray:
        embedder = self._require_embedder()
        parts = [np.zeros((0, embedder.dimension), dtype=np.float32)]
        for start in range(0, len(texts), EMBED_BATCH):
            parts.append(embedder.embed(texts[start : start + EMBED_BATCH]).astype(np.float32, copy=False))
            if progress:
                progress(min(start + EMBED_BATCH, len(texts)), len(texts))
        return np.concatenate(parts)

    def _delete_document(self, name: str) -> bool:
        row = self._connection.execute("SELECT id FROM documents WHERE name = ?", (name,)).fetchone()
        if row is None:
            return False
        self._connection.execute("DELETE FROM chunks WHERE document_id = ?", row)
        self._connection.execute("DELETE FROM documents WHERE id = ?", row)
        return True

    def _insert_document(self, document: ExtractedDocument, chunks: list[Chunk], vectors: np.ndarray) -> None:
        cursor = self._connection.execute(
            "INSERT INTO documents (name, kind, sha256, size_bytes, pages, added_at) VALUES (?, ?, ?, ?, ?, ?)",
            (document.name, document.kind, document.sha256, document.size_bytes, document.pages, time.time()),
        )
        self._connection.executemany(
            "INSERT INTO chunks (document_id, page, section, text, vector) VALUES (?, ?, ?, ?, ?)",
            (
                (cursor.lastrowid, chunk.page, chunk.section, chunk.text, vector.tobytes())
                for chunk, vector in zip(chunks, vectors)
            ),
        )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """All of the writes inside, or none; every committed write tells searchers to reload their vectors."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._set_meta("generation", str(int(self._meta("generation") or 0) + 1))
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    # --- the embedding model -----------------------------------------------

    def _require_embedder(self) -> Embedder:
        if self.embedder is None:
            raise KnowledgeError(f"knowledge base {self.name!r} was opened without an embedding model")
        return self.embedder

    def _check_model(self, built_with: str | None, embedder: Embedder) -> None:
        if built_with is not None and built_with != embedder.model_id:
            raise ModelMismatchError(
                f"knowledge base {self.name!r} was built with the embedding model {built_with}, not {embedder.model_id} "
                "(knowledge.model); rebuild it with this model, or set knowledge.model back"
            )

    def _adopt_model(self, embedder: Embedder) -> None:
        """Inside a write: an empty base takes the embedder's model; a filled one must have been built with it."""
        self._check_model(self.model_id, embedder)
        self._set_meta("model", embedder.model_id)

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

"""Answers from the user's own documents: extraction, passages, embeddings, and a searchable store per base.

The server's whole interface::

    library = KnowledgeLibrary(directory, embedder_for("embedded-minilm"))
    report = library.base("handbook", create=True).add([Path("handbook.pdf")])
    passages = library.search(["handbook"], "How many days of leave do I get?", k=3)
    context = prompt_block(passages, max_tokens=600)

Everything here runs offline; errors a user can act on are KnowledgeError (DocumentError for a file).
"""

from engines.knowledge.embedders import EMBEDDED_MINILM, EMBEDDED_MULTILINGUAL, Embedder, embedder_for
from engines.knowledge.errors import (
    DocumentError,
    DocumentTooLargeError,
    KnowledgeError,
    ModelMismatchError,
    UnsupportedDocumentError,
)
from engines.knowledge.extract import SUPPORTED, DocumentBytes, check_document
from engines.knowledge.library import DEFAULT_BASE, KnowledgeLibrary, check_name
from engines.knowledge.passages import Passage, estimate_tokens, prompt_block, prompt_entries
from engines.knowledge.store import DocumentInfo, IngestReport, KnowledgeBase, KnowledgeOptions

__all__ = [
    "DEFAULT_BASE",
    "EMBEDDED_MINILM",
    "EMBEDDED_MULTILINGUAL",
    "SUPPORTED",
    "DocumentBytes",
    "DocumentError",
    "DocumentInfo",
    "DocumentTooLargeError",
    "Embedder",
    "IngestReport",
    "KnowledgeBase",
    "KnowledgeError",
    "KnowledgeLibrary",
    "KnowledgeOptions",
    "ModelMismatchError",
    "Passage",
    "UnsupportedDocumentError",
    "check_document",
    "check_name",
    "embedder_for",
    "estimate_tokens",
    "prompt_block",
    "prompt_entries",
]

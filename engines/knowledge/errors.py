"""What goes wrong with knowledge bases, in words a user can act on."""

from __future__ import annotations


class KnowledgeError(ValueError):
    """A knowledge base, a document or the embedding model cannot be used; the message says why and what to do."""


class DocumentError(KnowledgeError):
    """A document cannot be indexed (unsupported, too large, encrypted, scanned, empty); the message names it."""


class ModelMismatchError(KnowledgeError):
    """A knowledge base was built with another embedding model than the one in use."""


class UnsupportedDocumentError(DocumentError):
    """A document of a type that cannot be indexed."""


class DocumentTooLargeError(DocumentError):
    """A document over the size limit (knowledge.max_file_mb)."""

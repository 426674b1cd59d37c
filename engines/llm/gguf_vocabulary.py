"""An English-output copy of a GGUF model: the same weights, without the tokens English text never uses.

A small model with a large multilingual vocabulary spends about half of each generated token on its output
layer: Gemma 3 270M scores all 262,144 tokens, a 168 M-parameter matrix, for ~100 M parameters of
transformer. Tokens whose text is not English (other scripts, accented letters) are never the
answer in an English conversation, so dropping their rows from the shared embedding/output matrix
makes every token cheaper and changes no English reply:

- With a SentencePiece ("llama") tokenizer, English text is merged only from pieces of English
  text, so every prompt tokenizes into the same pieces as before (renumbered).
- Sampling keeps the top tokens, and those are English tokens in an English conversation, so the
  candidates, and the reply, are the same.

A smaller copy, "common-english", keeps only the English pieces in common use: the first
``COMMON_MERGES`` English merges (SentencePiece's BPE scores are minus the merge order), the words of
a common-English word list and their inflected forms, every single character, and every piece those
are merged from, so common English text still tokenizes exactly as before. A rare word is written in
smaller pieces, or not at all; each token costs less again (``facecast bench llm`` compares the three).

Only the tokenizer arrays, the special-token ids and the vocabulary rows of the embedding (and of an
untied output matrix) change; the rest of the file is copied byte for byte. Only the GGUF parts this
needs are parsed (format: github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RULE_VERSION = 2  # part of the derived file's name: a changed rule derives a new file
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
VOCABULARY_TENSORS = ("token_embd.weight", "output.weight")
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")

# GGUF value types: struct format of the scalar ones; 8 is a string, 9 an array.
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
UINT32, INT32, FLOAT32, STRING, ARRAY = 4, 5, 6, 8, 9
# ggml tensor types: (elements per block, bytes per block), for the types a vocabulary matrix uses.
BLOCK_LAYOUT = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    30: (1, 2),  # BF16
}
# SentencePiece token types: a normal piece is kept when it is English text; unused ones go.
NORMAL, UNUSED = 1, 5
WORD_BOUNDARY = "\u2581"  # SentencePiece writes the space before a word as this
ENGLISH_EXTRA_CHARACTERS = frozenset("\n\r\t’‘“”–—…°€£")
COMMON_MERGES = 16_000
BYTE_LEVEL_SPACE = "\u0120"  # GPT-2's byte-level BPE writes the space before a word as this
# endings of inflected and derived forms ("warmly", "classifies"): the word list holds only base words
# that were whole tokens, and forms like these are not
WORD_ENDINGS = ("s", "es", "ed", "d", "ing", "ly", "ily", "er", "ier", "ers", "est", "iest", "ied", "ies", "y")
WORD_ENDINGS += ("ness", "ful", "less", "ment", "ments", "ally")


class UnsupportedModelError(ValueError):
    """The model's file or tokenizer is not one this module can reduce."""


def is_english_piece(text: str) -> bool:
    """Whether a SentencePiece token is English text: printable ASCII, or common typography."""
    return all(" " <= c <= "~" or c in ENGLISH_EXTRA_CHARACTERS for c in text.replace(WORD_BOUNDARY, " "))


KeepRule = Callable[[list[str], np.ndarray], np.ndarray]
"""(pieces, scores) of the normal tokens -> which of them to keep."""


def english_pieces(pieces: list[str], scores: np.ndarray) -> np.ndarray:
    return np.array([is_english_piece(piece) for piece in pieces], dtype=bool)


def words_of_bpe_tokenizer(tokenizer_json: Path) -> frozenset[str]:
    """The lower-case alphabetic words that are whole tokens of a byte-level BPE tokenizer
    (a Hugging Face ``tokenizer.json``): GPT-2's, which Whisper uses, holds ~28,000 English words."""
    vocabulary = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    words = (token.removeprefix(BYTE_LEVEL_SPACE) for token in vocabulary)
    return frozenset(word.lower() for word in words if word.isascii() and word.isalpha())


def common_english_pieces(words: frozenset[str]) -> KeepRule:
    """The rule for the "common-english" copy (module docstring), with ``words`` as its word list."""

    def keep(pieces: list[str], scores: np.ndarray) -> np.ndarray:
        english = english_pieces(pieces, scores)
        english_ids = np.flatnonzero(english)
        merge_rank = np.full(len(pieces), len(pieces))  # among the English pieces
        merge_rank[english_ids[np.argsort(-scores[english_ids], kind="stable")]] = np.arange(len(english_ids))
        text = [piece.replace(WORD_BOUNDARY, " ") for piece in pieces]
        chosen = english & (
            (merge_rank < COMMON_MERGES)
            | np.array([len(t) == 1 or is_word_form(t.strip().lower(), words) for t in text], dtype=bool)
        )
        english_scores = {pieces[i]: float(scores[i]) for i in english_ids}
        needed = {piece for i in np.flatnonzero(chosen) for piece in merge_path(pieces[i], english_scores)}
        return chosen | np.array([piece in needed for piece in pieces], dtype=bool)

    return keep


def is_word_form(text: str, words: frozenset[str]) -> bool:
    """Whether ``text`` is one of ``words``, or one of them with an ending (spelt as English spells it:
    "hope"+"ing" is "hoping", "stop"+"ed" "stopped", "carry"+"ies" "carries")."""
    if not (text.isascii() and text.isalpha()):
        return False
    if text in words:
        return True
    for ending in WORD_ENDINGS:
        stem = text[: -len(ending)]
        if len(stem) < 3 or not text.endswith(ending):
            continue
        doubled = stem[-1] == stem[-2] and stem[:-1] in words
        if stem in words or stem + "e" in words or doubled or (ending[0] == "i" and stem + "y" in words):
            return True
    return False


def merge_path(piece: str, scores: dict[str, float]) -> list[str]:
    """The pieces SentencePiece's BPE builds on its way to ``piece`` (highest-scoring pair first, as
    llama.cpp merges): a copy that keeps ``piece`` keeps these, so text still merges up to it."""
    symbols = list(piece)
    built: list[str] = []
    while len(symbols) > 1:
        pairs = [(scores[a + b], -k) for k, (a, b) in enumerate(itertools.pairwise(symbols)) if a + b in scores]
        if not pairs:
            break
        k = -max(pairs)[1]  # the best score; of equals, the leftmost
        symbols[k : k + 2] = [symbols[k] + symbols[k + 1]]
        built.append(symbols[k])
    return built


@dataclass
class Field:
    key: str
    start: int  # the key's first byte
    end: int  # one past the value's last byte
    value: object


@dataclass
class TensorInfo:
    name: str
    dims: list[int]
    ggml_type: int
    offset: int  # from the start of the data section


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.at = 0

    def scalar(self, fmt: str) -> object:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        # surrogateescape: a piece that is not valid UTF-8 is written back byte for byte
        text = bytes(self.data[self.at : self.at + length]).decode("utf-8", errors="surrogateescape")
        self.at += length
        return text

    def value(self, value_type: int) -> object:
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in SCALAR_FORMATS and item_type != 7:
                items = np.frombuffer(self.data, "<" + SCALAR_FORMATS[item_type], count, self.at)
                self.at += items.nbytes
                return items
            return [self.value(item_type) for _ in range(count)]
        if value_type not in SCALAR_FORMATS:
            raise UnsupportedModelError(f"unknown GGUF value type {value_type}")
        return self.scalar(SCALAR_FORMATS[value_type])


@dataclass
class GGUFLayout:
    version: int
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    data_start: int
    alignment: int

    @classmethod
    def read(cls, data: memoryview) -> GGUFLayout:
        if bytes(data[:4]) != MAGIC:
            raise UnsupportedModelError("not a GGUF file")
        try:
            return cls._parse(data)
        except UnsupportedModelError:
            raise
        except (struct.error, IndexError, ValueError, KeyError) as error:
            raise UnsupportedModelError(f"the GGUF file is damaged or truncated ({error})") from None

    @classmethod
    def _parse(cls, data: memoryview) -> GGUFLayout:
        reader = _Reader(data)
        reader.at = 4
        version, tensor_count, field_count = reader.scalar("I"), reader.scalar("Q"), reader.scalar("Q")
        if version < 2:
            raise UnsupportedModelError(f"GGUF version {version} is too old")
        fields = {}
        for _ in range(field_count):
            start = reader.at
            key = reader.string()
            value = reader.value(reader.scalar("I"))
            fields[key] = Field(key, start, reader.at, value)
        tensors = []
        for _ in range(tensor_count):
            name = reader.string()
            dims = [reader.scalar("Q") for _ in range(reader.scalar("I"))]
            tensors.append(TensorInfo(name, dims, reader.scalar("I"), reader.scalar("Q")))
        alignment = int(fields["general.alignment"].value) if "general.alignment" in fields else DEFAULT_ALIGNMENT
        return cls(version, fields, tensors, _aligned(reader.at, alignment), alignment)


def _aligned(offset: int, alignment: int) -> int:
    return offset + (-offset) % alignment


def _string(text: str) -> bytes:
    encoded = text.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(encoded)) + encoded


def _array_field(key: str, item_type: int, payload: bytes, count: int) -> bytes:
    return _string(key) + struct.pack("<IIQ", ARRAY, item_type, count) + payload


def _row_bytes(tensor: TensorInfo) -> int:
    if tensor.ggml_type not in BLOCK_LAYOUT:
        raise UnsupportedModelError(f"{tensor.name} has ggml type {tensor.ggml_type}, which is not supported here")
    block_elements, block_bytes = BLOCK_LAYOUT[tensor.ggml_type]
    return tensor.dims[0] // block_elements * block_bytes


def reduce_vocabulary(source: Path, target: Path, rule: KeepRule = english_pieces) -> int:
    """Write ``source`` to ``target`` with only the normal tokens ``rule`` keeps (and every special
    token); returns how many tokens are kept."""
    return _write_reduced(memoryview(source.read_bytes()), target, rule)


def _write_reduced(data: memoryview, target: Path, rule: KeepRule) -> int:
    layout = GGUFLayout.read(data)
    fields = layout.fields
    tokenizer = fields.get("tokenizer.ggml.model")
    if tokenizer is None or tokenizer.value != "llama":
        raise UnsupportedModelError(
            f"the tokenizer is {getattr(tokenizer, 'value', None)!r}; only SentencePiece ('llama') vocabularies "
            "can be reduced without changing how English text is tokenized"
        )
    missing = [key for key in TOKENIZER_ARRAYS if key not in fields]
    if missing:
        raise UnsupportedModelError(f"the vocabulary has no {', '.join(missing)}")
    pieces: list[str] = fields["tokenizer.ggml.tokens"].value
    types = np.asarray(fields["tokenizer.ggml.token_type"].value)
    scores = np.asarray(fields["tokenizer.ggml.scores"].value)
    special_ids = {
        key: int(f.value) for key, f in fields.items() if key.startswith("tokenizer.") and key.endswith("_token_id")
    }
    normal = np.flatnonzero(types == NORMAL)
    keep = types != UNUSED
    keep[normal] = rule([pieces[i] for i in normal], scores[normal])
    keep[[i for i in special_ids.values() if 0 <= i < len(keep)]] = True
    kept = np.flatnonzero(keep)
    new_id = np.cumsum(keep) - 1

    replaced = {
        "tokenizer.ggml.tokens": _array_field(
            "tokenizer.ggml.tokens", STRING, b"".join(_string(pieces[i]) for i in kept), len(kept)
        ),
        "tokenizer.ggml.token_type": _array_field(
            "tokenizer.ggml.token_type", INT32, types[kept].astype("<i4").tobytes(), len(kept)
        ),
        "tokenizer.ggml.scores": _array_field(
            "tokenizer.ggml.scores", FLOAT32, scores[kept].astype("<f4").tobytes(), len(kept)
        ),
        **{
            key: _string(key) + struct.pack("<II", UINT32, int(new_id[old]))
            for key, old in special_ids.items()
            if 0 <= old < len(keep)
        },
        **{key: _string(key) + struct.pack("<II", UINT32, len(kept)) for key in fields if key.endswith(".vocab_size")},
    }
    header = bytearray(data[:24])
    for key, field in fields.items():
        header += replaced.get(key, data[field.start : field.end])

    vocabulary = len(pieces)
    for tensor in layout.tensors:
        reducible = tensor.name in VOCABULARY_TENSORS and len(tensor.dims) == 2 and tensor.dims[1] == vocabulary
        if vocabulary in tensor.dims[:-1] or (tensor.dims[-1] == vocabulary) != reducible:
            raise UnsupportedModelError(f"{tensor.name} {tensor.dims} has the vocabulary in a shape not reduced here")
    spans = _spans(layout, len(data))
    chunks: list[bytes | memoryview] = []
    infos = bytearray()
    offset = 0
    for tensor in layout.tensors:
        start = layout.data_start + tensor.offset
        if tensor.name in VOCABULARY_TENSORS and tensor.dims[-1] == vocabulary:
            row = _row_bytes(tensor)
            rows = np.frombuffer(data, np.uint8, row * vocabulary, start).reshape(vocabulary, row)
            payload: bytes | memoryview = rows[kept].tobytes()
            dims = [tensor.dims[0], len(kept)]
        else:  # copied as it is, whatever its type, with the padding that follows it
            payload = data[start : start + spans[tensor.name]]
            dims = tensor.dims
        infos += _string(tensor.name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", tensor.ggml_type, offset)
        chunks.append(payload)
        offset = _aligned(offset + len(payload), layout.alignment)

    with open(target, "wb") as out:
        out.write(header)
        out.write(infos)
        out.write(bytes(_aligned(out.tell(), layout.alignment) - out.tell()))
        for payload in chunks:
            out.write(payload)
            out.write(bytes((-len(payload)) % layout.alignment))
    return len(kept)


def _spans(layout: GGUFLayout, file_size: int) -> dict[str, int]:
    """Bytes from each tensor's start to the next tensor's (the last: to the end of the file)."""
    ordered = sorted(layout.tensors, key=lambda t: t.offset)
    ends = [t.offset for t in ordered[1:]] + [file_size - layout.data_start]
    return {tensor.name: end - tensor.offset for tensor, end in zip(ordered, ends)}


def english_vocabulary_model(source: Path, cache_dir: Path, common_words: frozenset[str] | None = None) -> Path:
    """The English-output copy of ``source`` in ``cache_dir``, derived once: with ``common_words``, the
    "common-english" copy that keeps those words (module docstring).

    The copy's name holds the source's path, size and modification time, the rule's version and the
    word list, so a replaced model or a changed rule derives a new one. Written under a temporary name
    and renamed into place, as the embedded model is.
    """
    stat = source.stat()
    name, rule = (
        ("english", english_pieces) if common_words is None else ("common-english", common_english_pieces(common_words))
    )
    words = "\n".join(sorted(common_words or ()))
    identity = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{RULE_VERSION}|{words}"
    key = hashlib.sha256(identity.encode()).hexdigest()
    target = cache_dir / f"{source.stem}.{name}-{key[:16]}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache_dir, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    try:
        kept = reduce_vocabulary(source, Path(temporary), rule)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    log.info("derived %s: %d tokens (%s output) from %s", target.name, kept, name, source)
    return target

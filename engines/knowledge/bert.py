"""A BERT sentence encoder for sentence-transformers folders: our own forward pass in plain torch.

A folder holds ``config.json`` (a ``bert`` model), ``tokenizer.json``, ``model.safetensors`` or
``pytorch_model.bin``, and optionally ``sentence_bert_config.json`` (max_seq_length) and
``1_Pooling/config.json`` (mean or CLS pooling). Sentence vectors are pooled over the real tokens and
L2-normalised, as sentence-transformers does for all-MiniLM-L6-v2 and paraphrase-multilingual-MiniLM.
No transformers import: the encoder is a few matrix products.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
WEIGHT_PREFIXES = ("", "bert.", "0.auto_model.")
BATCH_SIZE = 32
# Inputs are padded (and masked) to a multiple of this many tokens: each new input length costs the
# CPU kernels a slow first run, so fewer lengths means a warm-up covers every question.
LENGTH_STEP = 8
WARM_UP_TOKENS = 64  # questions are shorter than this


class BertModelError(ValueError):
    """A model folder is missing a file or holds a model this encoder cannot run; the message says which."""


@dataclass(frozen=True)
class BertConfig:
    layers: int
    heads: int
    layer_norm_eps: float
    max_tokens: int
    cls_pooling: bool


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (an 8-byte header length, a JSON header, then raw little-endian data)."""
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    body = memoryview(data)[8 + header_length :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            continue  # integer buffers (position_ids) are not weights
        start, end = entry["data_offsets"]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(entry["shape"]).float()
    return tensors


def weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise BertModelError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def _read_json(path: Path, default: dict[str, object] | None = None) -> dict[str, object]:
    if not path.is_file():
        if default is not None:
            return default
        raise BertModelError(f"{path} is missing: the folder is not a sentence-transformers BERT model")
    return json.loads(path.read_text())


def _read_config(folder: Path) -> BertConfig:
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "bert":
        raise BertModelError(
            f"{folder}: model_type {config.get('model_type')!r} is not supported; use a BERT sentence-transformers "
            "model (all-MiniLM-L6-v2, paraphrase-multilingual-MiniLM-L12-v2, ...)"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise BertModelError(f"{folder}: hidden_act {config['hidden_act']!r} is not supported (only gelu)")
    st_config = _read_json(folder / "sentence_bert_config.json", {})
    pooling = _read_json(folder / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True})
    if not (pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode_cls_token")):
        raise BertModelError(f"{folder}: only mean or CLS pooling is supported")
    return BertConfig(
        layers=int(config["num_hidden_layers"]),
        heads=int(config["num_attention_heads"]),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        max_tokens=min(int(st_config.get("max_seq_length", 256)), int(config["max_position_embeddings"])),
        cls_pooling=bool(pooling.get("pooling_mode_cls_token")) and not pooling.get("pooling_mode_mean_tokens"),
    )


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WEIGHT_PREFIXES:
        if f"{prefix}embeddings.word_embeddings.weight" in tensors:
            renamed = {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}
            # Checkpoints from before transformers 4 call LayerNorm's parameters gamma and beta.
            return {name.replace(".gamma", ".weight").replace(".beta", ".bias"): t for name, t in renamed.items()}
    raise BertModelError("the weights hold no BERT embeddings (embeddings.word_embeddings.weight)")


class BertEncoder:
    """Sentence vectors from a sentence-transformers BERT folder; ``encode`` is safe to call from several threads."""

    def __init__(self, folder: Path) -> None:
        self.config = _read_config(folder)
        self.weights_path = weights_file(folder)
        if self.weights_path.suffix == ".safetensors":
            tensors = read_safetensors(self.weights_path)
        else:
            tensors = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        self.w = {name: t.float().contiguous() for name, t in _strip_prefix(tensors).items()}
        self.dimension = self.w["embeddings.word_embeddings.weight"].shape[1]
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.config.max_tokens)
        self.tokenizer.no_padding()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dimension)`` float32 unit vectors; texts are batched by length to pad little."""
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda index: len(encodings[index].ids))
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            vectors[batch] = self._forward([encodings[index] for index in batch]).numpy()
        return vectors

    def warm_up(self) -> None:
        """Run every padded length a question can have once, so that no visitor's question pays for a first run."""
        for words in range(1, WARM_UP_TOKENS, LENGTH_STEP):
            self.encode([" ".join(["word"] * words)])

    def _forward(self, encodings: list) -> torch.Tensor:
        longest = max(len(encoding.ids) for encoding in encodings)
        length = min(-(-longest // LENGTH_STEP) * LENGTH_STEP, self.config.max_tokens)
        ids = torch.zeros((len(encodings), length), dtype=torch.long)
        types = torch.zeros_like(ids)
        mask = torch.zeros((len(encodings), length), dtype=torch.bool)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
            types[row, : len(encoding.ids)] = torch.tensor(encoding.type_ids)
            mask[row, : len(encoding.ids)] = True
        with torch.inference_mode():
            hidden = self._encoder(ids, types, mask)
            if self.config.cls_pooling:
                pooled = hidden[:, 0]
            else:
                weights = mask.unsqueeze(-1).float()
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, dim=-1)

    def _encoder(self, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w, eps = self.w, self.config.layer_norm_eps
        positions = torch.arange(ids.shape[1])
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][positions]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm", eps)
        batch, length, width = x.shape
        heads = self.config.heads
        attention_mask = mask[:, None, None, :]
        for layer in range(self.config.layers):
            p = f"encoder.layer.{layer}."

            def split_heads(t: torch.Tensor) -> torch.Tensor:
                return t.view(batch, length, heads, width // heads).transpose(1, 2)

            q = split_heads(self._linear(x, p + "attention.self.query"))
            k = split_heads(self._linear(x, p + "attention.self.key"))
            v = split_heads(self._linear(x, p + "attention.self.value"))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
            context = context.transpose(1, 2).reshape(batch, length, width)
            x = self._layer_norm(
                self._linear(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm", eps
            )
            inner = F.gelu(self._linear(x, p + "intermediate.dense"))
            x = self._layer_norm(self._linear(inner, p + "output.dense") + x, p + "output.LayerNorm", eps)
        return x

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def _layer_norm(self, x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w[name + ".weight"], self.w[name + ".bias"], eps)

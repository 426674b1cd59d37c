"""``facecast models fetch voice NAME``: a Piper voice from the Piper project's catalogue, on a connected machine.

The catalogue (``voices.json`` of rhasspy/piper-voices at a fixed revision, or a mirror of it given with
``--from``) lists each voice's files with their md5; a file is kept only if its md5 matches, and the
model's sha256 is printed for the user's records (``facecast doctor`` shows it too). The voice's model
card is fetched first and its licence printed: voices have licences of their own (most MIT or CC0, some
non-commercial). The voice lands in ``models/voices`` as NAME.onnx + NAME.onnx.json, where the Piper
engine finds it: from the next start, a persona speaking its language uses it with no configuration.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from engines.embedded_models import sha256_of
from media_server.cli.downloads import TIMEOUT_S, ModelFetchError, download

PIPER_VOICES_URL = "https://huggingface.co/rhasspy/piper-voices/resolve/v1.0.0"
CATALOGUE = "voices.json"
MODEL_CARD = "MODEL_CARD"
VOICE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
LICENCE_LINE = re.compile(r"licen[cs]e", re.IGNORECASE)
MAX_SUGGESTIONS = 12


@dataclass(frozen=True)
class VoiceFile:
    path: str  # inside the catalogue's folder
    md5: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def fetch_voice_command(key: str | None, source: str, folder: Path) -> None:
    """Run ``facecast models fetch voice KEY``; a failure prints its reason and exits with status 2."""
    try:
        if not key:
            raise ModelFetchError(
                "name the voice, e.g. `facecast models fetch voice de_DE-thorsten-medium`; "
                "a language code (`de`, `de_DE`) lists that language's voices"
            )
        model = fetch_voice(key, source, folder, sys.stdout)
    except ModelFetchError as error:
        print(f"facecast: models fetch voice: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"{key}: ready in {model.parent}\n"
        f"  sha256 {sha256_of(model)}\n"
        f"  From the next start, personas speaking its language use it (tts.engine \"piper\" or \"combined\", "
        f"voices_dir {folder}); a persona can also name it: voice = \"{key}\"."
    )


def fetch_voice(key: str, source: str, folder: Path, out: TextIO) -> Path:
    """Fetch voice ``key`` from the catalogue at ``source`` into ``folder``; the path of its model.

    Its licence is printed to ``out`` before the model is downloaded. ModelFetchError (naming similar
    voices when ``key`` is not one) when it cannot.
    """
    if not VOICE_KEY.fullmatch(key):
        raise ModelFetchError(f"{key!r} is not a voice name (e.g. de_DE-thorsten-medium)")
    voices = catalogue(source)
    if key not in voices:
        similar = similar_voices(voices, key)
        hint = f"; voices like it: {', '.join(similar[:MAX_SUGGESTIONS])}" if similar else ""
        more = f" and {len(similar) - MAX_SUGGESTIONS} more" if len(similar) > MAX_SUGGESTIONS else ""
        raise ModelFetchError(f"no voice {key!r} in the catalogue at {source}{hint}{more}")
    files = voice_files(key, voices[key], source)
    for file in sorted(files, key=lambda f: f.name != MODEL_CARD):  # the card, with the licence, first
        destination = folder / (f"{key}.{MODEL_CARD}" if file.name == MODEL_CARD else file.name)
        if not (destination.is_file() and md5_of(destination) == file.md5.lower()):
            download(f"{source.rstrip('/')}/{urllib.parse.quote(file.path)}", destination, {"md5": file.md5})
        if file.name == MODEL_CARD:
            print(f"{key}: licence terms: {licence(destination.read_text(encoding='utf-8', errors='replace'))}", file=out)
            print("By downloading it you accept them.", file=out)
    return folder / f"{key}.onnx"


def catalogue(source: str) -> dict[str, Any]:
    """The catalogue of voices at ``source`` (``voices.json``): voice name -> entry."""
    url = f"{source.rstrip('/')}/{CATALOGUE}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            voices = json.load(response)
    except (urllib.error.URLError, OSError) as error:
        raise ModelFetchError(f"could not read the voice catalogue {url}: {error}") from error
    except ValueError as error:
        raise ModelFetchError(f"{url} is not a Piper voice catalogue (not JSON: {error})") from error
    if not isinstance(voices, dict):
        raise ModelFetchError(f"{url} is not a Piper voice catalogue (not an object of voices)")
    return voices


def voice_files(key: str, entry: Any, source: str) -> list[VoiceFile]:
    """The model, its config and its card, as the catalogue lists them for ``key``."""
    listed = entry.get("files") if isinstance(entry, dict) else None
    listed = listed if isinstance(listed, dict) else {}
    wanted = {f"{key}.onnx", f"{key}.onnx.json", MODEL_CARD}
    files = [
        VoiceFile(path, str(info.get("md5_digest", "")))
        for path, info in listed.items()
        if isinstance(info, dict) and path.rsplit("/", 1)[-1] in wanted
    ]
    found = {file.name for file in files if re.fullmatch(r"[0-9a-fA-F]{32}", file.md5)}
    if {f"{key}.onnx", f"{key}.onnx.json"} - found:
        raise ModelFetchError(f"the catalogue at {source} lists no model and config with their md5 for {key!r}")
    return [file for file in files if file.name in found]


def similar_voices(voices: dict[str, Any], wanted: str) -> list[str]:
    """Voices whose name starts with ``wanted`` or whose language is ``wanted`` ("de", "de_DE", "de-de")."""
    wanted_language = wanted.replace("-", "_").lower()
    return sorted(
        key
        for key, entry in voices.items()
        if key.lower().startswith(wanted.lower())
        or wanted_language in language_codes(entry.get("language") if isinstance(entry, dict) else None)
    )


def language_codes(language: Any) -> set[str]:
    if not isinstance(language, dict):
        return set()
    return {str(language.get(field, "")).lower() for field in ("code", "family")} - {""}


def licence(model_card: str) -> str:
    """The licence lines of a voice's model card, or the card itself when it has none."""
    lines = [line.strip(" *-#\t") for line in model_card.splitlines() if LICENCE_LINE.search(line)]
    return "; ".join(lines) if lines else model_card.strip()


def md5_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "md5").hexdigest()

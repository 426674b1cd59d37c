"""``facecast models fetch NAME``: download a model Facecast cannot ship, on a machine with internet access.

Facecast never downloads anything while it serves; this command is the one deliberate exception,
run by hand. The URL, sha256, destination and licence of each model come from the configuration
(``[models.NAME]``). The download streams into a hidden partial file next to the destination while
its sha256 is computed; only a file with the expected hash is renamed into place, so a failed,
interrupted or tampered download leaves nothing behind. The model's licence terms are printed first.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TextIO

from engines.embedded_models import sha256_of
from media_server.cli.avatars import Progress
from media_server.config import PROJECT_ROOT, Settings

BLOCK = 1 << 20
TIMEOUT_S = 60


class ModelFetchError(ValueError):
    """The model could not be fetched; nothing was written. The message says why."""


def fetch_file(url: str, sha256: str, destination: Path, progress_stream: TextIO = sys.stderr) -> bool:
    """Download ``url`` to ``destination`` if it is not already there with this sha256; True if it downloaded.

    ModelFetchError (with nothing written) on a network error or a hash mismatch.
    """
    expected = sha256.lower()
    if destination.is_file() and sha256_of(destination) == expected:
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, partial.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            progress = Progress(f"downloading {destination.name}", total, progress_stream, scale=2**20, unit=" MB")
            while block := response.read(BLOCK):
                out.write(block)
                digest.update(block)
                progress.advance(len(block))
            progress.close()
        found = digest.hexdigest()
        if found != expected:
            raise ModelFetchError(
                f"sha256 mismatch for {url}: expected {expected}, got {found}; the download was discarded and "
                f"nothing was written to {destination}"
            )
        os.replace(partial, destination)
    except (urllib.error.URLError, OSError) as error:
        raise ModelFetchError(f"could not download {url}: {error}; nothing was written to {destination}") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return True


def configure_parser(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="models_command", required=True)
    fetch = commands.add_parser("fetch", help="download a model named in [models.NAME] of the configuration")
    fetch.add_argument("name", help="e.g. wav2lip")


def main(args: argparse.Namespace, settings: Settings) -> None:
    """Run ``facecast models fetch NAME``; a failure prints its reason and exits with status 2."""
    source = settings.models.get(args.name)
    if source is None:
        known = ", ".join(settings.models) or "none"
        print(
            f"facecast: models fetch: no [models.{args.name}] in the configuration; configured: {known}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    destination = source.path if source.path.is_absolute() else PROJECT_ROOT / source.path
    print(f"{args.name}: licence terms: {source.licence}\nBy downloading it you accept them.\n")
    try:
        downloaded = fetch_file(source.url, source.sha256, destination)
    except ModelFetchError as error:
        print(f"facecast: models fetch: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    state = "downloaded to" if downloaded else "already present, sha256 verified:"
    print(f"{args.name}: {state} {destination}")

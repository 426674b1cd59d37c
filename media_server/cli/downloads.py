"""Downloads that must arrive whole and verified: a failed, interrupted or tampered download leaves nothing.

The file streams into a hidden partial file next to the destination while its digests are computed; only
a file whose digests all match is renamed into place.
"""

from __future__ import annotations

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

BLOCK = 1 << 20
TIMEOUT_S = 60


class ModelFetchError(ValueError):
    """The model could not be fetched; nothing was written. The message says why."""


def fetch_file(url: str, sha256: str, destination: Path, progress_stream: TextIO = sys.stderr) -> bool:
    """Download ``url`` to ``destination`` if it is not already there with this sha256; True if it downloaded.

    ModelFetchError (with nothing written) on a network error or a hash mismatch.
    """
    if destination.is_file() and sha256_of(destination) == sha256.lower():
        return False
    download(url, destination, {"sha256": sha256}, progress_stream)
    return True


def download(url: str, destination: Path, digests: dict[str, str], progress_stream: TextIO = sys.stderr) -> str:
    """Stream ``url`` into ``destination``, only if its ``digests`` (algorithm -> hex) all match; its sha256.

    ModelFetchError (with nothing written) on a network error or a mismatch.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    hashes = {algorithm: hashlib.new(algorithm) for algorithm in {*digests, "sha256"}}
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, partial.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            progress = Progress(f"downloading {destination.name}", total, progress_stream, scale=2**20, unit=" MB")
            while block := response.read(BLOCK):
                out.write(block)
                for digest in hashes.values():
                    digest.update(block)
                progress.advance(len(block))
            progress.close()
        for algorithm, expected in digests.items():
            found = hashes[algorithm].hexdigest()
            if found != expected.lower():
                raise ModelFetchError(
                    f"{algorithm} mismatch for {url}: expected {expected.lower()}, got {found}; the download was "
                    f"discarded and nothing was written to {destination}"
                )
        os.replace(partial, destination)
    except (urllib.error.URLError, OSError) as error:
        raise ModelFetchError(f"could not download {url}: {error}; nothing was written to {destination}") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return hashes["sha256"].hexdigest()

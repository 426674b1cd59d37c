"""``facecast models fetch NAME``: download a model Facecast cannot ship, on a machine with internet access.

Facecast never downloads anything while it serves; this command is the one deliberate exception,
run by hand. The URL, sha256, destination and licence of each model come from the configuration
(``[models.NAME]``); only a file with the expected hash is kept (``downloads``). The model's licence
terms are printed first. ``facecast models fetch voice NAME`` fetches a Piper voice (``voices``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.tts.piper.engine import FETCHED_VOICES_DIR
from media_server.cli.downloads import ModelFetchError, fetch_file
from media_server.cli.voices import PIPER_VOICES_URL, fetch_voice_command
from media_server.config import PROJECT_ROOT, Settings


def configure_parser(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="models_command", required=True)
    fetch = commands.add_parser(
        "fetch", help="download a model named in [models.NAME] of the configuration, or a Piper voice: fetch voice NAME"
    )
    fetch.add_argument("name", help="e.g. wav2lip, or voice")
    fetch.add_argument("voice", nargs="?", help="with `voice`: the Piper voice, e.g. de_DE-thorsten-medium")
    fetch.add_argument(
        "--from", dest="source", default=PIPER_VOICES_URL, help="with `voice`: the catalogue's folder (a mirror)"
    )
    fetch.add_argument(
        "--to", dest="folder", type=Path, default=FETCHED_VOICES_DIR, help="with `voice`: where it goes (tts voices_dir)"
    )


def main(args: argparse.Namespace, settings: Settings) -> None:
    """Run ``facecast models fetch NAME`` (or ``voice NAME``); a failure prints its reason and exits with status 2."""
    if args.name == "voice":
        fetch_voice_command(args.voice, args.source, args.folder)
        return
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

"""``facecast knowledge add|list|remove|search|rebuild``: the knowledge bases the avatar answers from.

Bases live in ``knowledge.dir``, one ``NAME.sqlite`` each. Adding documents is all or nothing: one
bad file in the batch and the base is left as it was. A document of a name the base already holds
replaces it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from engines.knowledge import SUPPORTED, KnowledgeError, ModelMismatchError
from media_server.cli.avatars import Progress
from media_server.config import KnowledgeSettings, Settings
from media_server.conversation.knowledge import open_library


class _EmbeddingProgress:
    """A progress bar for embedding passages, drawn only once there are passages to embed."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress("embedding passages", total)
        self.bar.advance(done - self.bar.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _add(args: argparse.Namespace, settings: KnowledgeSettings) -> None:
    library = open_library(settings)
    progress = _EmbeddingProgress()
    try:
        report = library.base(args.name, create=True).add(args.files, progress)
    finally:
        progress.close()
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    pages = sum(info.pages or 0 for info in report.added)
    passages = sum(info.passages for info in report.added)
    print(
        f"added {len(report.added)} document(s) to {args.name!r}: {passages} passages"
        + (f", {pages} PDF pages" if pages else "")
        + f", in {report.seconds:.1f} s"
    )
    if report.replaced:
        print(f"replaced: {', '.join(report.replaced)}")


def _list(args: argparse.Namespace, settings: KnowledgeSettings) -> None:
    library = open_library(settings, with_model=False)
    if args.name is None:
        names = library.names()
        if not names:
            print(f"no knowledge bases in {library.directory}")
        for name in names:
            base = library.base(name)
            documents = base.documents()
            print(
                f"{name}: {len(documents)} document(s), {sum(d.passages for d in documents)} passages, "
                f"model {base.model_id or '(none yet)'}"
            )
        return
    documents = library.base(args.name).documents()
    if not documents:
        print(f"{args.name!r} holds no documents")
    for info in documents:
        added = datetime.fromtimestamp(info.added_at).strftime("%Y-%m-%d %H:%M")
        pages = f"{info.pages} pages, " if info.pages else ""
        print(
            f"{info.name}  ({info.kind}, {pages}{info.passages} passages, {info.size_bytes / 1024:.1f} KB, added {added})"
        )


def _remove(args: argparse.Namespace, settings: KnowledgeSettings) -> None:
    open_library(settings, with_model=False).base(args.name).remove(args.document)
    print(f"removed {args.document!r} from {args.name!r}")


def _search(args: argparse.Namespace, settings: KnowledgeSettings) -> None:
    passages = open_library(settings).base(args.name).search(args.question, args.k or settings.top_k)
    if args.json:
        print(json.dumps([{**vars(p), "location": p.location} for p in passages], indent=2, ensure_ascii=False))
        return
    if not passages:
        print(f"no passage in {args.name!r} is relevant to the question")
    for number, passage in enumerate(passages, start=1):
        print(f"[{number}] {passage.source}  (relevance {passage.relevance:.2f})\n    {passage.snippet}")


def _rebuild(args: argparse.Namespace, settings: KnowledgeSettings) -> None:
    library = open_library(settings)
    progress = _EmbeddingProgress()
    try:
        count = library.base(args.name).rebuild(progress)
    finally:
        progress.close()
    print(f"rebuilt {args.name!r}: {count} passages embedded with {settings.model}")


COMMANDS = {"add": _add, "list": _list, "remove": _remove, "search": _search, "rebuild": _rebuild}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="knowledge_command", required=True)
    add = commands.add_parser("add", help="add documents to a knowledge base (created if new); same name replaces")
    add.add_argument(
        "name", help="the knowledge base: lower-case letters, digits, - and _ ('default' for every persona)"
    )
    add.add_argument("files", type=Path, nargs="+", metavar="FILE", help=SUPPORTED)
    listing = commands.add_parser("list", help="list the knowledge bases, or one base's documents")
    listing.add_argument("name", nargs="?")
    remove = commands.add_parser("remove", help="remove a document from a knowledge base")
    remove.add_argument("name")
    remove.add_argument("document", help="the document's name as `list NAME` shows it")
    search = commands.add_parser("search", help="the passages a question retrieves, with their sources")
    search.add_argument("name")
    search.add_argument("question")
    search.add_argument("-k", type=int, help="passages to show (default: knowledge.top_k)")
    search.add_argument("--json", action="store_true", help="print the passages as JSON")
    rebuild = commands.add_parser("rebuild", help="embed a base's passages again with knowledge.model")
    rebuild.add_argument("name")


def main(args: argparse.Namespace, settings: Settings) -> None:
    """Run ``facecast knowledge ...``; a problem the user can fix prints its message and exits with status 2."""
    try:
        COMMANDS[args.knowledge_command](args, settings.knowledge)
    except ModelMismatchError as error:
        print(f"facecast: knowledge: {error}: run `facecast knowledge rebuild {args.name}`", file=sys.stderr)
        raise SystemExit(2) from None
    except KnowledgeError as error:
        print(f"facecast: knowledge {args.knowledge_command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None

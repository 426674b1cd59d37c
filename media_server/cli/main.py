"""The ``facecast`` command: serve, doctor, bench, worker and the tools."""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import logging
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

from engines.base import EngineConfigError, EngineLoadError
from media_server.cli.dependencies import CONSTRAINTS_FILE
from media_server.config import ConfigError, ServerSettings, Settings, load_settings

# Loggers whose INFO lines a user needs without -v: which stage is loading, so that a crash is never silent.
STARTUP_LOGGERS = ("media_server.runtime",)


class ServeError(RuntimeError):
    """The server could not start for a reason the user can fix (the message says how)."""


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes section.key=value, got {pair!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def _settings(args: argparse.Namespace) -> Settings:
    overrides = _parse_sets([*args.set, *getattr(args, "set_after", [])])
    if getattr(args, "host", None):
        overrides["server.host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["server.port"] = str(args.port)
    flags = (
        ("tls_cert", "server.tls_cert"),
        ("tls_key", "server.tls_key"),
        ("rtmp", "broadcast.rtmp_url"),
        ("cluster", "cluster.url"),
    )
    for flag, key in flags:
        if getattr(args, flag, None):
            overrides[key] = str(getattr(args, flag))
    return load_settings(args.config, overrides)


def tls_context(server: ServerSettings) -> ssl.SSLContext | None:
    """The server's TLS context when server.tls_cert and server.tls_key are set, else None (plain HTTP)."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"server.tls_cert/tls_key: cannot load {server.tls_cert} and {server.tls_key}: {error}"
        ) from error
    return context


def _serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from media_server.cli.avatars import avatar_of_face
    from media_server.http.app import create_app
    from media_server.runtime import Runtime

    settings = avatar_of_face(_settings(args))
    server = settings.server
    context = tls_context(server)
    runtime = Runtime.load(settings)
    scheme = "https" if context else "http"
    print(f"Facecast ready: open {scheme}://{server.host}:{server.port}/", flush=True)
    try:
        web.run_app(create_app(runtime), host=server.host, port=server.port, ssl_context=context, print=None)
    except OSError as error:  # the address is taken or not this machine's
        raise ServeError(
            f"cannot listen on {server.host}:{server.port}: {error.strerror or error}; "
            "choose another with --host/--port or server.host/server.port"
        ) from error


def _doctor(args: argparse.Namespace) -> None:
    from media_server.cli.doctor import report

    print(json.dumps(report(_settings(args), args.constraints), indent=2, default=str))


def _module_command(module: str) -> Callable[[argparse.Namespace], None]:
    """A sub-command whose work lives in ``media_server.<module>.main(args, settings)``, imported only when run."""

    def run(args: argparse.Namespace) -> None:
        importlib.import_module(f"media_server.{module}").main(args, _settings(args))

    return run


BENCHMARKS = {
    name: f"cli.bench.{name}"
    for name in (
        "turn",
        "lipsync",
        "llm",
        "video",
        "tts",
        "startup",
        "soak",
        "capacity",
        "avatarchatbot",
        "remote",
        "cluster",
        "knowledge",
    )
}

# Sub-commands that configure their own arguments: name, module, help.
TOOL_COMMANDS = (
    ("avatars", "cli.avatars", "add avatars from a photo or a short video"),
    ("render", "cli.render", "write an MP4 of an avatar speaking an audio file"),
    ("knowledge", "cli.knowledge", "documents the avatar answers from: add, list, remove, search"),
    ("models", "cli.models", "download models Facecast cannot ship (run by hand, on a connected machine)"),
    ("worker", "cli.worker", "render lip-sync and render jobs for a cluster's media nodes (needs --cluster)"),
)
CLUSTER_HELP = "join the cluster of this NATS server, e.g. nats://nats.example.org:4222 (cluster.url)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facecast", description="Live talking-avatar server")
    parser.add_argument("--config", type=Path, help="a TOML file overriding config/default.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one setting")
    parser.add_argument("-v", "--verbose", action="store_true")
    # --set also after the command ("facecast serve --set ..."): its own list, merged with the one before it.
    settable = argparse.ArgumentParser(add_help=False)
    settable.add_argument(
        "--set", dest="set_after", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one setting"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server", parents=[settable])
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate (chain) to serve HTTPS; with --tls-key")
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    serve.add_argument("--rtmp", metavar="URL", help="start the default broadcast session and push it to this RTMP URL")
    serve.add_argument("--cluster", metavar="URL", help=CLUSTER_HELP)
    serve.set_defaults(run=_serve)
    doctor = commands.add_parser("doctor", help="report engines, models, devices and codecs", parents=[settable])
    doctor.add_argument(
        "--constraints",
        type=Path,
        default=CONSTRAINTS_FILE,
        help="the pip constraints file of the tested versions (default: the checkout's constraints.txt)",
    )
    doctor.add_argument("--cluster", metavar="URL", help="also check the connection to this NATS server (cluster.url)")
    doctor.set_defaults(run=_doctor)
    bench = commands.add_parser("bench", help="benchmarks", parents=[settable])
    bench.add_argument("what", choices=list(BENCHMARKS))
    bench.add_argument(
        "-n", type=int, default=22, help="turn, avatarchatbot, remote: questions to ask (22: the whole corpus once)"
    )
    bench.add_argument("--seconds", type=float, default=2.0, help="lipsync: timing budget per backend and batch size")
    bench.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    bench.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also run these settings on the same questions, for a side-by-side comparison (repeatable)",
    )
    bench.add_argument("--barge-ins", type=int, default=10, help="interruptions to measure")
    bench.add_argument("--minutes", type=float, default=30.0, help="soak: how long the session talks")
    bench.add_argument("--clients", type=int, default=6, help="cluster: pages talking at once")
    bench.add_argument("--every", type=float, default=20.0, help="soak: seconds from one question to the next")
    bench.add_argument(
        "--long-turns",
        type=int,
        default=50,
        help="typed turns in one session, to compare turn 50's first token with turn 1's (0: skip)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="capacity: fewer and shorter steps; cluster: 2 pages, 2 questions each"
    )
    bench.add_argument("--say", action="store_true", help="capacity: speaking sessions say a sentence (no LLM)")
    bench.add_argument(
        "--llm-server",
        action="store_true",
        help="capacity: the LLM is llama.cpp's own OpenAI-compatible server (llm.engine=openai), not in-process",
    )
    bench.set_defaults(run=lambda args: _module_command(BENCHMARKS[args.what])(args))
    for name, module, help_text in TOOL_COMMANDS:
        tool = commands.add_parser(name, help=help_text, parents=[settable])
        importlib.import_module(f"media_server.{module}").configure_parser(tool)
        tool.set_defaults(run=_module_command(module))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # A crash inside a native library (llama.cpp, onnxruntime, torch, ...) prints the Python stack of
    # every thread on stderr instead of dying with a bare "Segmentation fault".
    faulthandler.enable()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for name in STARTUP_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        args.run(args)
    except (ConfigError, EngineConfigError) as error:
        print(f"facecast: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (EngineLoadError, ServeError) as error:
        logging.getLogger(__name__).debug("details", exc_info=error)
        print(f"facecast: {error}", file=sys.stderr)
        raise SystemExit(1) from None

"""The ``facecast`` command: serve, doctor, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engines.registry import EngineConfigError
from media_server.config import ConfigError, Settings, load_settings


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes section.key=value, got {pair!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def _settings(args: argparse.Namespace) -> Settings:
    overrides = _parse_sets(args.set)
    if getattr(args, "host", None):
        overrides["server.host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["server.port"] = str(args.port)
    return load_settings(args.config, overrides)


def _serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from media_server.app import create_app
    from media_server.runtime import Runtime

    settings = _settings(args)
    runtime = Runtime.load(settings)
    print(f"Facecast ready: open http://{settings.server.host}:{settings.server.port}/", flush=True)
    web.run_app(create_app(runtime), host=settings.server.host, port=settings.server.port, print=None)


def _doctor(args: argparse.Namespace) -> None:
    from media_server.doctor import report

    print(json.dumps(report(_settings(args)), indent=2, default=str))


def _bench(args: argparse.Namespace) -> None:
    from media_server import bench

    bench.main(args, _settings(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facecast", description="Live talking-avatar server")
    parser.add_argument("--config", type=Path, help="a TOML file overriding config/default.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one setting")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=_serve)
    doctor = commands.add_parser("doctor", help="report engines, models, devices and codecs")
    doctor.set_defaults(run=_doctor)
    bench = commands.add_parser("bench", help="benchmarks")
    bench.add_argument("what", choices=["turn"])
    bench.add_argument("-n", type=int, default=12, help="questions to ask")
    bench.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ConfigError, EngineConfigError) as error:
        print(f"facecast: {error}", file=sys.stderr)
        raise SystemExit(2) from None

"""A real Facecast server (real models, real HTTP, real WebRTC on loopback), loaded once per test run."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp import web

from media_server.config import load_settings
from media_server.http.app import create_app
from media_server.http.state import SESSIONS
from media_server.runtime import Runtime
from media_server.testing.harness import Scripted
from media_server.testing.loopback_client import LoopbackClient

MAX_TEST_SESSIONS = 3


@pytest.fixture(scope="session")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    overrides = {
        "api.outputs_dir": str(tmp_path_factory.mktemp("outputs")),
        "server.max_sessions": str(MAX_TEST_SESSIONS),
        "server.client_timeout_s": "4",
        "server.offers_per_minute": "0",  # every test connects from 127.0.0.1: the limit is tested on its own
        "tts.reply_timeout_s": "2",
        "knowledge.dir": str(tmp_path_factory.mktemp("knowledge")),  # not the user's own knowledge bases
    }
    settings = load_settings(None, overrides, environ={})
    loaded = Runtime.load(settings)
    yield loaded
    loaded.close()


@dataclass
class LiveServer:
    app: web.Application
    base_url: str


@pytest_asyncio.fixture(scope="session")
async def live_server(runtime: Runtime) -> AsyncIterator[LiveServer]:
    app = create_app(runtime)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield LiveServer(app, f"http://127.0.0.1:{port}")
    await runner.cleanup()


@pytest.fixture
def server_app(live_server: LiveServer) -> web.Application:
    return live_server.app


@pytest.fixture
def base_url(live_server: LiveServer) -> str:
    return live_server.base_url


@pytest_asyncio.fixture
async def client_factory(live_server: LiveServer) -> AsyncIterator:
    """Connect real aiortc peers; every one is closed and its server session gone after the test."""
    clients: list[LoopbackClient] = []

    async def connect(echo_gain: float = 0.0, **choices: str) -> LoopbackClient:
        client = LoopbackClient(live_server.base_url, echo_gain=echo_gain)
        clients.append(client)
        await client.connect(**choices)
        return client

    yield connect
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()
    for session in list(live_server.app[SESSIONS].talks.values()):
        await session.close()


@pytest_asyncio.fixture
async def scripted():
    made: list[Scripted] = []

    def make(**kwargs: object) -> Scripted:
        made.append(Scripted(**kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for conversation in made:
        await conversation.close()

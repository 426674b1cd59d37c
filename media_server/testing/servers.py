"""aiohttp apps served on loopback for tests: ``served`` on the running event loop, ``serving`` by an event
loop in a thread of its own, so that blocking clients (requests, schemathesis) can call it from the test's."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator

from aiohttp import web

START_TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def served(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """``app`` served on this event loop until the block ends (on ``port``, or a free one), as ``facecast serve``
    serves it (a handler is not cancelled when its client goes away); yields its root URL."""
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def serving(app: web.Application, port: int = 0) -> Iterator[str]:
    """``app`` served by a loop of its own until the block ends (on ``port``, or a free one); yields its root URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=1, handler_cancellation=True)
    bound: concurrent.futures.Future[int] = concurrent.futures.Future()

    def run() -> None:
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", port)
        loop.run_until_complete(site.start())
        bound.set_result(site._server.sockets[0].getsockname()[1])
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{bound.result(START_TIMEOUT_S)}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(START_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
        loop.close()

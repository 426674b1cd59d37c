"""An aiohttp app served on a free loopback port by an event loop in a thread of its own, so that blocking
clients (requests, a sync test, schemathesis) can call it from the test's thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Iterator

from aiohttp import web

START_TIMEOUT_S = 10.0


@contextlib.contextmanager
def serving(app: web.Application) -> Iterator[str]:
    """``app`` served until the block ends; yields its root URL (``http://127.0.0.1:PORT``)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=1, handler_cancellation=True)
    port: concurrent.futures.Future[int] = concurrent.futures.Future()

    def run() -> None:
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port.set_result(site._server.sockets[0].getsockname()[1])
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port.result(START_TIMEOUT_S)}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(START_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
        loop.close()

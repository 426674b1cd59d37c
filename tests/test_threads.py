"""Blocking iterators consumed from the event loop: the producer pauses on request and stops with its consumer."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from media_server.threads import iterate_in_thread


def counting(produced: list[int], cancelled: threading.Event) -> Iterator[int]:
    for i in range(100):
        if cancelled.is_set():
            return
        produced.append(i)
        yield i


async def test_a_paused_worker_stops_after_its_current_item_and_resumes_in_order() -> None:
    produced: list[int] = []
    running = threading.Event()
    running.set()
    items = iterate_in_thread(lambda cancelled: counting(produced, cancelled), running=running)
    assert await anext(items) == 0
    running.clear()
    await asyncio.sleep(0.2)
    paused_at = len(produced)
    await asyncio.sleep(0.3)
    assert len(produced) == paused_at < 100  # nothing computed while paused
    running.set()
    assert [item async for item in items] == list(range(1, 100))


async def test_a_paused_worker_stops_when_the_consumer_goes() -> None:
    produced: list[int] = []
    running = threading.Event()
    items = iterate_in_thread(lambda cancelled: counting(produced, cancelled), running=running)
    task = asyncio.ensure_future(anext(items))
    await asyncio.sleep(0.2)
    assert produced == [] and not task.done()
    task.cancel()  # as a barge-in cancels the turn's task
    with contextlib.suppress(asyncio.CancelledError):
        await task
    running.set()
    await asyncio.sleep(0.3)
    assert produced == []


async def test_an_unbounded_worker_runs_ahead() -> None:
    produced: list[int] = []
    items = iterate_in_thread(lambda cancelled: counting(produced, cancelled))
    assert await anext(items) == 0
    await asyncio.sleep(0.3)
    assert len(produced) == 100
    await items.aclose()

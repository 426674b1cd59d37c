"""Blocking iterators consumed from the event loop: a consumer that stops taking pauses the producer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

from media_server.threads import iterate_in_thread


def counting(produced: list[int], cancelled: threading.Event) -> Iterator[int]:
    for i in range(100):
        if cancelled.is_set():
            return
        produced.append(i)
        yield i


async def test_a_bounded_worker_waits_for_the_consumer_and_stops_when_it_goes() -> None:
    produced: list[int] = []
    items = iterate_in_thread(lambda cancelled: counting(produced, cancelled), max_ahead=2)
    assert await anext(items) == 0
    await asyncio.sleep(0.3)  # the consumer holds: the worker has written at most two items ahead
    assert len(produced) <= 4
    assert [await anext(items) for _ in range(3)] == [1, 2, 3]
    await items.aclose()
    await asyncio.sleep(0.3)
    assert len(produced) <= 7


async def test_an_unbounded_worker_runs_ahead() -> None:
    produced: list[int] = []
    items = iterate_in_thread(lambda cancelled: counting(produced, cancelled))
    assert await anext(items) == 0
    await asyncio.sleep(0.3)
    assert len(produced) == 100
    await items.aclose()

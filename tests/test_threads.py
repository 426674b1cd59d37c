"""Blocking iterators consumed from the event loop: the producer pauses on request and stops with its consumer."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

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

    def pausing_after_the_first(cancelled: threading.Event) -> Iterator[int]:
        for i in counting(produced, cancelled):
            yield i
            if i == 0:
                running.clear()  # as the pipeline does when the first chunk goes to TTS

    items = iterate_in_thread(pausing_after_the_first, running=running)
    assert await anext(items) == 0
    await asyncio.sleep(0.3)
    assert produced == [0, 1]  # the item being computed when it paused, and nothing more
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


async def test_an_iterator_that_fails_to_start_fails_its_consumer() -> None:
    def broken(cancelled: threading.Event) -> Iterator[int]:
        raise RuntimeError("no model")

    with pytest.raises(RuntimeError, match="no model"):
        await asyncio.wait_for(anext(iterate_in_thread(broken)), timeout=5)


def test_items_come_while_the_loops_thread_pool_is_busy() -> None:
    """Sessions queued behind a paused model's lock fill the shared pool; the stream resuming it must still run."""

    async def with_a_full_pool() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        release = threading.Event()
        blocked = loop.run_in_executor(None, release.wait)
        try:
            produced: list[int] = []
            items = iterate_in_thread(lambda cancelled: counting(produced, cancelled))
            assert await asyncio.wait_for(anext(items), timeout=5) == 0
            await items.aclose()
        finally:
            release.set()
            await blocked

    asyncio.run(with_a_full_pool())  # a loop of its own: the tests' shared loop keeps its pool

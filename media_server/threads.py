"""Blocking engine iterators consumed from the event loop without blocking it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()
SLOT_POLL_S = 0.05  # how often a paused worker checks for cancellation


async def iterate_in_thread(
    make_iterator: Callable[[threading.Event], Iterator[T]], max_ahead: int | None = None
) -> AsyncIterator[T]:
    """Run ``make_iterator(cancelled)`` in a worker thread and yield its items here as they come.

    When the consumer stops early (a barge-in cancels its task), ``cancelled`` is set and the
    iterator is closed in its own thread after its current item, so model work stops promptly.
    With ``max_ahead``, the worker waits while that many items are not yet taken: a consumer that
    stops taking pauses the model, and its cores go to other work.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[object] = asyncio.Queue()
    cancelled = threading.Event()
    slots = threading.Semaphore(max_ahead) if max_ahead else None

    def wait_for_slot() -> bool:
        while not slots.acquire(timeout=SLOT_POLL_S):
            if cancelled.is_set():
                return False
        return True

    def produce() -> None:
        iterator = make_iterator(cancelled)
        try:
            for item in iterator:
                if slots is not None and not wait_for_slot():
                    break
                loop.call_soon_threadsafe(items.put_nowait, item)
                if cancelled.is_set():
                    break
        except BaseException as error:  # handed to the consumer, which re-raises it
            loop.call_soon_threadsafe(items.put_nowait, error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            if not loop.is_closed():
                loop.call_soon_threadsafe(items.put_nowait, _DONE)

    worker = loop.run_in_executor(None, produce)
    try:
        while True:
            item = await items.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            if slots is not None:
                slots.release()
            yield item  # type: ignore[misc]
    finally:
        cancelled.set()
        if not worker.done():
            worker.add_done_callback(lambda _: None)

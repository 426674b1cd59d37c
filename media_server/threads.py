"""Blocking engine iterators consumed from the event loop without blocking it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()
PAUSE_POLL_S = 0.05  # how often a paused worker checks for cancellation


async def iterate_in_thread(
    make_iterator: Callable[[threading.Event], Iterator[T]], running: threading.Event | None = None
) -> AsyncIterator[T]:
    """Run ``make_iterator(cancelled)`` in a worker thread and yield its items here as they come.

    When the consumer stops early (a barge-in cancels its task), ``cancelled`` is set and the
    iterator is closed in its own thread after its current item, so model work stops promptly.
    With ``running``, the worker starts each next item only while it is set: clearing it pauses the
    model after the item it is computing, and its cores go to other work.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[object] = asyncio.Queue()
    cancelled = threading.Event()

    def may_go_on() -> bool:
        while running is not None and not running.wait(timeout=PAUSE_POLL_S):
            if cancelled.is_set():
                return False
        return not cancelled.is_set()

    def produce() -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = make_iterator(cancelled)
            while may_go_on():
                item = next(iterator, _DONE)
                if item is _DONE:
                    break
                loop.call_soon_threadsafe(items.put_nowait, item)
        except BaseException as error:  # handed to the consumer, which re-raises it
            loop.call_soon_threadsafe(items.put_nowait, error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            if not loop.is_closed():
                loop.call_soon_threadsafe(items.put_nowait, _DONE)

    # A thread of its own, not the loop's shared pool: a paused worker holding a model's lock, and the
    # pool threads queued behind that lock, must never leave the worker that would resume it without a thread.
    threading.Thread(target=produce, name="iterate-in-thread", daemon=True).start()
    try:
        while True:
            item = await items.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        cancelled.set()

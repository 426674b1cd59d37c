"""Every engine call of a turn has a deadline (``[deadlines]``): a stalled engine fails the turn with an
error the user sees, instead of leaving it thinking forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

T = TypeVar("T")


class StageTimeout(TimeoutError):
    def __init__(self, stage: str, seconds: float, setting: str) -> None:
        super().__init__(f"the {stage} engine did not answer within {seconds:g} s (deadlines.{setting})")


async def within(awaitable: Awaitable[T], seconds: float, stage: str, setting: str) -> T:
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            return await awaitable
    except TimeoutError:
        if deadline.expired():
            raise StageTimeout(stage, seconds, setting) from None
        raise


async def items_within(
    items: AsyncIterator[T], first: tuple[float, str], following: tuple[float, str], stage: str
) -> AsyncIterator[T]:
    """``items`` as they come: the first within ``first`` = (seconds, setting), each next one within ``following``."""
    seconds, setting = first
    while True:
        try:
            item = await within(anext(items), seconds, stage, setting)
        except StopAsyncIteration:
            return
        yield item
        seconds, setting = following

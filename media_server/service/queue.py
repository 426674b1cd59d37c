"""Renders run a few at a time, others wait in a bounded queue, and beyond it a request is refused at once
(503 with Retry-After) instead of piling up work the machine cannot do."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from media_server.service.errors import Busy


class RenderQueue:
    def __init__(self, concurrent: int, waiting: int) -> None:
        self.concurrent = concurrent
        self.waiting = waiting
        self._slots = asyncio.Semaphore(concurrent)
        self._admitted = 0  # rendering or waiting

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold a render slot for the block, waiting for one if the queue has room; Busy if it has none."""
        if self._admitted >= self.concurrent + self.waiting:
            raise Busy(
                f"{self.concurrent} render(s) running and {self.waiting} waiting, the most allowed "
                "(api.max_concurrent_renders, api.render_queue): try again shortly"
            )
        self._admitted += 1
        try:
            async with self._slots:
                yield
        finally:
            self._admitted -= 1

"""What every kind of session is: an avatar's output and a conversation, long-lived tasks that are
supervised, a watchdog, and one way to close.

A task of a session that fails (the output clock, the microphone loop, a viewer pump) is logged with
its traceback, the client gets an ``error`` event, and the session closes: a frozen avatar never holds
a session slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

from engines.avatar import Avatar
from engines.base import ChatMessage, EngineSet
from media_server.config import Settings
from media_server.conversation.conversation import Conversation
from media_server.conversation.events import Error, Event
from media_server.conversation.knowledge import Retriever
from media_server.conversation.persona import PersonaProfile
from media_server.media.timeline import AvatarOutput
from media_server.metrics import ServerMetrics

log = logging.getLogger(__name__)
WATCHDOG_PERIOD_S = 1.0


@dataclass(frozen=True)
class ConversationMemory:
    """A talk session's conversation: its id (the page keeps it), what earlier sessions of it said, and who
    keeps its history for the next one (a cluster; no one on a single machine)."""

    id: str
    history: tuple[ChatMessage, ...] = ()
    keep: Callable[[list[ChatMessage]], None] = lambda history: None


@dataclass(frozen=True)
class SessionSetup:
    """Who talks and with what: the server's shared settings, engines, knowledge bases and metrics, and the
    session's avatar, persona and voice. Every kind of session is opened from one."""

    settings: Settings
    engines: EngineSet
    metrics: ServerMetrics
    avatar: Avatar
    persona: PersonaProfile
    voice: str
    memory: ConversationMemory | None = None
    knowledge: Retriever | None = None

    def names(self) -> dict[str, str]:
        return {"avatar": self.avatar.name, "persona": self.persona.name, "voice": self.voice}


class MediaSession(ABC):
    kind: ClassVar[str]

    def __init__(self, session_id: str, setup: SessionSetup, on_closed: Callable[[MediaSession], None]) -> None:
        self.id = session_id
        self.setup = setup
        self.settings = setup.settings
        self.metrics = setup.metrics
        self.created = time.monotonic()
        self.closed = False
        self._on_closed = on_closed
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: asyncio.Task[None] | None = None
        self.output = AvatarOutput(
            setup.engines.lipsync, setup.avatar, setup.settings.media, session_id, setup.metrics.late_ticks.inc
        )
        self.conversation = Conversation(
            engines=setup.engines,
            settings=setup.settings,
            persona=setup.persona,
            voice=setup.voice,
            output=self.output,
            metrics=setup.metrics,
            emit=self.send_event,
            history=setup.memory.history if setup.memory else (),
            on_history=setup.memory.keep if setup.memory else lambda history: None,
            knowledge=setup.knowledge,
        )

    @abstractmethod
    def send_event(self, event: Event) -> None:
        """Deliver ``event`` to whoever watches this session (events sent before anyone listens are lost)."""

    @abstractmethod
    async def check_clients(self, now: float) -> str | None:
        """Drop clients that are gone; say why the session itself should close now, or None."""

    def start(self) -> None:
        self.spawn(self.output.run(), "output clock")
        self.spawn(self._watchdog(), "watchdog")
        self.conversation.begin()

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        """Run a long-lived task of this session: if it fails, the session reports it and closes."""
        task = asyncio.create_task(coroutine, name=f"{self.kind} session {self.id}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self.closed or task.exception() is None:
            return
        error = task.exception()
        log.error("%s failed; closing the session", task.get_name(), exc_info=error)
        self.metrics.errors.labels("session_failed").inc()
        self.send_event(Error("session_failed", f"the session stopped working and was closed: {error}"))
        self.close_soon()

    def close_soon(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self.close())

    async def _watchdog(self) -> None:
        while not self.closed:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            reason = await self.check_clients(time.monotonic())
            if reason is not None:
                log.info("%s session %s: %s, closing", self.kind, self.id, reason)
                await self.close()

    async def close(self) -> None:
        """Close once: the turn, every task, the transport and the output; then free the session's slot."""
        if self.closed:
            return
        self.closed = True
        await self.conversation.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        with contextlib.suppress(Exception):
            await self._close_transport()
        self.output.close()
        self.metrics.frames_sent.inc(self.output.frames_sent)
        self.metrics.frames_dropped.inc(self.output.video.dropped + self.output.audio.dropped)
        self._on_closed(self)

    @abstractmethod
    async def _close_transport(self) -> None:
        """Close what carries the session to its client(s): peer connections, RTMP pushes."""

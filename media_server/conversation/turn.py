"""One turn: the user's input and the avatar's reply to it, with the time each stage was reached.

A speculative turn (started in a short pause of the user's, before it is known to be the end of their
turn) is prepared like any other but shows nothing: its events wait in the turn and its frames in the
avatar's output until it is confirmed, or it is dropped when the user goes on talking.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engines.base import ChatMessage
from media_server.conversation.events import Error, Event, ReplyFinal
from media_server.metrics import STAGES


def _new_future() -> asyncio.Future[ReplyFinal | Error]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Turn:
    id: int
    started: float  # time.monotonic() at the end of the user's speech, or the typed message's arrival
    confirmed: bool = True
    marks: dict[str, float] = field(default_factory=dict)
    reply: str = ""
    reply_in_history: bool = False
    remembered: bool = True  # False: the exchange stays out of the history (the avatar repeating itself)
    speed: float = 1.0  # the speech rate of its reply; the conversation's from then on once it is confirmed
    question: ChatMessage | None = None  # until it is in the history
    held_events: list[Event] = field(default_factory=list)
    # Cleared while the first chunk is synthesised: the LLM pauses, and TTS has the cores.
    llm_may_run: threading.Event = field(default_factory=threading.Event)
    # The final reply (or the error that ended the turn), for whoever waits for the text (POST .../chat).
    outcome: asyncio.Future[ReplyFinal | Error] = field(default_factory=_new_future)

    def __post_init__(self) -> None:
        self.llm_may_run.set()

    def mark(self, stage: str) -> None:
        self.marks.setdefault(stage, time.monotonic())

    def latencies_ms(self) -> dict[str, float]:
        return {stage: round((self.marks[stage] - self.started) * 1000, 1) for stage in STAGES if stage in self.marks}

    def send(self, event: Event, emit: Callable[[Event], None]) -> None:
        """Emit ``event`` now, or keep it until the turn is confirmed."""
        if self.confirmed:
            emit(event)
        else:
            self.held_events.append(event)

    def confirm(self, emit: Callable[[Event], None]) -> None:
        self.confirmed = True
        events, self.held_events = self.held_events, []
        for event in events:
            emit(event)

    def settle(self, outcome: ReplyFinal | Error) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)

    async def until_confirmed(self) -> None:
        while not self.confirmed:
            await asyncio.sleep(0.02)

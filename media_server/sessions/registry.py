"""Every open session, of both kinds, and the server's capacity.

A slot is taken (``reserve``) before anything is awaited, so concurrent requests can never open more
than ``server.max_sessions`` sessions between them; a reservation that is not committed gives its
slot back, whatever went wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from media_server.metrics import ServerMetrics
from media_server.sessions.base import MediaSession
from media_server.sessions.broadcast import BroadcastSession
from media_server.sessions.talk import TalkSession

# Told of every session that opens (True) or closes (False): the cluster routes each session's APIs to its node.
SessionListener = Callable[[MediaSession, bool], None]


class ServerFull(Exception):
    pass


class SessionExists(Exception):
    pass


class Reservation:
    """One session slot (and a broadcast id), held until the ``with`` block that uses it ends."""

    def __init__(self, registry: SessionRegistry, broadcast_id: str | None) -> None:
        self._registry = registry
        self.broadcast_id = broadcast_id

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._registry._release(self)

    def commit(self, session: MediaSession) -> None:
        self._registry._add(session)


class SessionRegistry:
    def __init__(self, capacity: int, metrics: ServerMetrics) -> None:
        self.capacity = capacity
        self.metrics = metrics
        self.talks: dict[str, TalkSession] = {}
        self.broadcasts: dict[str, BroadcastSession] = {}
        self._reserved = 0
        self._reserved_ids: set[str] = set()
        self.listeners: list[SessionListener] = []

    @property
    def open_sessions(self) -> int:
        """Talk and broadcast sessions together: both cost the same (an output, lip-sync and encoding)."""
        return len(self.talks) + len(self.broadcasts)

    def reserve(self, broadcast_id: str | None = None) -> Reservation:
        """A slot for one session (and the broadcast id, if given): commit the session inside the reservation's
        ``with`` block, or the slot is free again when it ends. ServerFull or SessionExists when there is none."""
        if broadcast_id is not None and (broadcast_id in self.broadcasts or broadcast_id in self._reserved_ids):
            raise SessionExists(f"broadcast session {broadcast_id!r} exists already")
        if self.open_sessions + self._reserved >= self.capacity:
            raise ServerFull(f"all {self.capacity} sessions are in use; try again shortly")
        self._reserved += 1
        if broadcast_id is not None:
            self._reserved_ids.add(broadcast_id)
        return Reservation(self, broadcast_id)

    def _release(self, reservation: Reservation) -> None:
        self._reserved -= 1
        if reservation.broadcast_id is not None:
            self._reserved_ids.discard(reservation.broadcast_id)

    def _add(self, session: MediaSession) -> None:
        if isinstance(session, BroadcastSession):
            self.broadcasts[session.id] = session
        elif isinstance(session, TalkSession):
            self.talks[session.id] = session
        self.metrics.sessions_total.inc()
        self._update_gauge()
        for listener in self.listeners:
            listener(session, True)

    def forget(self, session: MediaSession) -> None:
        """A session closed: its slot is free (passed to every session as its ``on_closed``)."""
        for sessions in (self.talks, self.broadcasts):
            if sessions.get(session.id) is session:
                del sessions[session.id]
                for listener in self.listeners:
                    listener(session, False)
        self._update_gauge()

    def _update_gauge(self) -> None:
        self.metrics.sessions.set(self.open_sessions)

    async def close_all(self) -> None:
        sessions: list[MediaSession] = [*self.talks.values(), *self.broadcasts.values()]
        await asyncio.gather(*(session.close() for session in sessions))

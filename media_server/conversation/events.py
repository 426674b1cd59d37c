"""Every event a session sends its client on the `events` data channel, as typed values.

Each serialises with ``to_json()`` to the object described in docs/protocol.md; nothing else in the
server writes an event by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar, Literal

State = Literal["listening", "thinking", "speaking"]


@dataclass(frozen=True)
class Event:
    type: ClassVar[str]

    def fields(self) -> dict[str, object]:
        return {}

    def to_dict(self) -> dict[str, object]:
        return {"type": self.type, **self.fields()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass(frozen=True)
class SessionInfo(Event):
    type: ClassVar[str] = "session"
    session_id: str
    avatar: str
    persona: str
    voice: str
    broadcast: bool = False
    viewer_id: str | None = None
    conversation: str | None = None  # a talk session's conversation id, for the page to send when it reconnects
    resumed: int = 0  # messages of that conversation remembered from earlier sessions

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {
            "session_id": self.session_id,
            "avatar": self.avatar,
            "persona": self.persona,
            "voice": self.voice,
        }
        if self.conversation is not None:
            out["conversation"] = self.conversation
        if self.resumed:
            out["resumed"] = self.resumed
        if self.broadcast:
            out["broadcast"] = True
        if self.viewer_id is not None:
            out["viewer_id"] = self.viewer_id
        return out


@dataclass(frozen=True)
class StateChanged(Event):
    type: ClassVar[str] = "state"
    state: State

    def fields(self) -> dict[str, object]:
        return {"state": self.state}


@dataclass(frozen=True)
class Transcript(Event):
    """The user's words: partial while they speak, final once (with its turn), or a typed message; with
    the language they were recognised in when the persona detects it."""

    type: ClassVar[str] = "transcript"
    text: str
    final: bool
    turn: int | None = None
    typed: bool = False
    language: str | None = None

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {"text": self.text, "final": self.final}
        if self.typed:
            out["typed"] = True
        if self.turn is not None:
            out["turn"] = self.turn
        if self.language:
            out["language"] = self.language
        return out


@dataclass(frozen=True)
class ReplyDelta(Event):
    type: ClassVar[str] = "reply"
    delta: str
    turn: int

    def fields(self) -> dict[str, object]:
        return {"delta": self.delta, "final": False, "turn": self.turn}


@dataclass(frozen=True)
class ReplyFinal(Event):
    type: ClassVar[str] = "reply"
    text: str
    turn: int
    interrupted: bool = False

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {"text": self.text, "final": True}
        if self.interrupted:
            out["interrupted"] = True
        out["turn"] = self.turn
        return out


@dataclass(frozen=True)
class Spoken(Event):
    """A sentence of the avatar's reply, sent when its first frame plays: what the user hears now."""

    type: ClassVar[str] = "spoken"
    turn: int
    text: str

    def fields(self) -> dict[str, object]:
        return {"turn": self.turn, "text": self.text}


@dataclass(frozen=True)
class Source:
    document: str
    location: str  # "page 3", a section's headings, or "" for plain text
    snippet: str


@dataclass(frozen=True)
class Sources(Event):
    """The passages of the persona's documents a reply was given to answer from."""

    type: ClassVar[str] = "sources"
    turn: int
    sources: tuple[Source, ...]

    def fields(self) -> dict[str, object]:
        return {
            "turn": self.turn,
            "sources": [{"document": s.document, "location": s.location, "snippet": s.snippet} for s in self.sources],
        }


@dataclass(frozen=True)
class TurnLatency(Event):
    """When a reply's first audio is sent: milliseconds from the end of the user's input to each stage."""

    type: ClassVar[str] = "metrics"
    turn: int
    latency_ms: dict[str, float] = field(default_factory=dict)

    def fields(self) -> dict[str, object]:
        return {"turn": self.turn, "latency_ms": dict(self.latency_ms)}


@dataclass(frozen=True)
class PlaybackGap(Event):
    """When a reply played to its end: the longest stretch playback waited for the pipeline."""

    type: ClassVar[str] = "metrics"
    turn: int
    longest_gap_ms: float

    def fields(self) -> dict[str, object]:
        return {"turn": self.turn, "longest_gap_ms": self.longest_gap_ms}


@dataclass(frozen=True)
class Interrupted(Event):
    type: ClassVar[str] = "interrupted"
    reason: str
    stopped_after_ms: float | None = None

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {"reason": self.reason}
        if self.stopped_after_ms is not None:
            out["stopped_after_ms"] = self.stopped_after_ms
        return out


@dataclass(frozen=True)
class Resumed(Event):
    type: ClassVar[str] = "resumed"


@dataclass(frozen=True)
class Error(Event):
    type: ClassVar[str] = "error"
    code: str
    message: str

    def fields(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Pong(Event):
    type: ClassVar[str] = "pong"

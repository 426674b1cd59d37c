"""What clients send a session, checked once for every way it arrives (the data channel, the HTTP APIs).

Nothing a client sends may raise anything but ``BadMessage``: not bytes that are not UTF-8, not JSON
nested thousands deep, not a text with NUL characters or lone surrogates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MAX_TEXT_CHARS = 2000
MAX_MESSAGE_BYTES = 64 * 1024
# NUL and the other C0 controls but tab and newlines; lone surrogates (which cannot be encoded as UTF-8).
UNSPEAKABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class BadMessage(ValueError):
    """What the client sent cannot be used; the message says what to send instead."""


def checked_text(value: object, kind: str = "text") -> str:
    """A text for the avatar to answer or speak: a non-empty string of at most MAX_TEXT_CHARS, trimmed."""
    if not isinstance(value, str) or not value.strip():
        raise BadMessage(f'"{kind}" needs a non-empty string "text"')
    if len(value) > MAX_TEXT_CHARS:
        raise BadMessage(f"text longer than {MAX_TEXT_CHARS} characters")
    if UNSPEAKABLE.search(value):
        raise BadMessage("text holds control characters or invalid Unicode (lone surrogates); send plain text")
    return value.strip()


def checked_session_id(value: object) -> str:
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise BadMessage('"id" must be 1 to 64 letters, digits, "-" or "_"')
    return value


CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


def checked_conversation_id(value: object) -> str:
    if not isinstance(value, str) or not CONVERSATION_ID.fullmatch(value):
        raise BadMessage('"conversation" must be 8 to 64 letters, digits, "-" or "_"')
    return value


def json_object(raw: str | bytes) -> dict[str, object]:
    """``raw`` as a JSON object, or BadMessage (never RecursionError or UnicodeDecodeError)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadMessage("not JSON, or nested too deeply") from None
    if not isinstance(value, dict):
        raise BadMessage(f"JSON, but a {type(value).__name__}, not a JSON object")
    return value


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class Ping:
    pass


ClientMessage = Text | Say | Interrupt | Ping


def client_message(raw: object) -> ClientMessage:
    """One `events` data-channel message from a client."""
    if not isinstance(raw, str | bytes) or len(raw) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"messages must be JSON objects with a \"type\", at most {MAX_MESSAGE_BYTES} bytes")
    try:
        event = json_object(raw)
    except BadMessage:
        raise BadMessage('messages must be JSON objects with a "type"') from None
    kind = event.get("type")
    if kind == "text":
        return Text(checked_text(event.get("text"), "text"))
    if kind == "say":
        return Say(checked_text(event.get("text"), "say"))
    if kind == "interrupt":
        return Interrupt()
    if kind == "ping":
        return Ping()
    if not isinstance(kind, str):
        raise BadMessage('messages must be JSON objects with a "type"')
    raise BadMessage(f"unknown message type {kind[:40]!r}; use text, say, interrupt or ping")

"""Talk sessions' histories in a key-value bucket, so a page that reconnects to another node (its node
died, or it was placed elsewhere) goes on with the same conversation.

The page keeps a conversation id and sends it with each offer; the history is stored under it after
every exchange, bounded (the newest ``memory.max_history_messages`` messages that fit in
``MAX_BYTES``) and forgotten ``cluster.conversation_ttl_s`` after its last change (the bucket's TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re

from nats.js.errors import KeyNotFoundError

from engines.base import ChatMessage
from media_server.cluster.link import BucketSpec, ClusterLink

log = logging.getLogger(__name__)
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
MAX_BYTES = 64 * 1024
LOAD_TIMEOUT_S = 1.0  # a new session never waits longer for its history: it starts fresh instead


def encode_history(history: list[ChatMessage], max_messages: int) -> bytes:
    """The newest messages, at most ``max_messages`` and ``MAX_BYTES`` of JSON, oldest first."""
    kept = history[-max_messages:]
    while True:
        data = json.dumps([{"role": m.role, "text": m.text} for m in kept]).encode()
        if len(data) <= MAX_BYTES or not kept:
            return data
        kept = kept[1:]


def decode_history(data: bytes) -> list[ChatMessage]:
    return [ChatMessage(m["role"], m["text"]) for m in json.loads(data) if m.get("role") in ("user", "assistant")]


class ConversationStore:
    def __init__(self, link: ClusterLink, max_messages: int) -> None:
        self.link = link
        self.max_messages = max_messages
        self.spec = BucketSpec("conversations", ttl_s=link.settings.conversation_ttl_s, max_value_bytes=MAX_BYTES)
        self._latest: dict[str, list[ChatMessage]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}

    async def load(self, conversation_id: str) -> list[ChatMessage]:
        """The stored history, or none (unknown id, or the broker is away: the session starts afresh)."""
        if not self.link.connected:
            return []
        try:
            bucket = await self.link.kv(self.spec)
            entry = await asyncio.wait_for(bucket.get(conversation_id), LOAD_TIMEOUT_S)
            return decode_history(entry.value or b"[]")
        except KeyNotFoundError:
            return []
        except Exception as error:  # noqa: BLE001 - a conversation without its past beats no conversation
            log.warning("cluster: could not load conversation %s: %s", conversation_id, error)
            return []

    def save_soon(self, conversation_id: str, history: list[ChatMessage]) -> None:
        """Store ``history`` in the background; while a write is under way only the latest waits for it."""
        self._latest[conversation_id] = history
        if conversation_id not in self._writers:
            task = asyncio.get_running_loop().create_task(self._write(conversation_id))
            self._writers[conversation_id] = task

    async def _write(self, conversation_id: str) -> None:
        try:
            while (history := self._latest.pop(conversation_id, None)) is not None:
                if not self.link.connected:
                    continue  # the broker's bad moment: this exchange is not kept
                with contextlib.suppress(Exception):
                    bucket = await self.link.kv(self.spec)
                    await bucket.put(conversation_id, encode_history(history, self.max_messages))
        finally:
            self._writers.pop(conversation_id, None)

"""Replies from any OpenAI-compatible ``/chat/completions`` server (Ollama, vLLM, llama.cpp's server,
OpenAI, ...), streamed over server-sent events as the tokens arrive.

The persona becomes a system message and its example exchanges user/assistant messages, followed by
the conversation, bounded by an estimate of its tokens (the server's tokenizer is not known here).
A barge-in closes the HTTP connection at once, which is how these servers learn to stop generating.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from pydantic import Field

from engines.base import ChatMessage, LLMEngine, Persona
from engines.llm.context import question_with_context
from engines.openai_compatible import Deadline, OpenAIClient, RemoteSettings, server_error_detail

# A token is about four characters of English, and each message costs a few tokens of framing.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
WARM_UP_MESSAGES = [{"role": "user", "content": "Hello!"}]


class OpenAILLM(LLMEngine):
    class Settings(RemoteSettings):
        temperature: float = Field(0.7, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        max_tokens: int = Field(256, ge=1)  # always sent: it caps every reply
        first_token_timeout_s: float = Field(30.0, gt=0)  # from the request to the reply's first text
        max_history_tokens: int = Field(2048, ge=16)  # estimated; the oldest exchanges are dropped first

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client = OpenAIClient(settings, "llm", "LLM server")
        self._first_token = Deadline(settings.first_token_timeout_s, "first_token_timeout_s")

    def stream_reply(
        self,
        persona: Persona,
        history: list[ChatMessage],
        cancelled: Callable[[], bool],
        context: str = "",
    ) -> Iterator[str]:
        messages = chat_messages(persona, history, self._settings.max_history_tokens, context)
        return self._client.stream(
            lambda: self._deltas(messages, self._settings.max_tokens), cancelled, self._first_token
        )

    async def _deltas(self, messages: list[dict[str, str]], max_tokens: int) -> AsyncIterator[str]:
        s = self._settings
        body = {
            "model": await self._client.model(),
            "messages": messages,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        finished = False
        async with self._client.request("POST", "chat/completions", json=body) as response:
            async for data in self._client.sse_data(response):
                if data.strip() == "[DONE]":  # read on to the end of the body, so the connection is reused
                    finished = True
                    continue
                choice = self._choice(data)
                if choice is None:
                    continue
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str) and delta["content"]:
                    yield delta["content"]
                finished = finished or bool(choice.get("finish_reason"))
        if not finished:
            raise self._client.error(f"{self._client.where} ended the reply stream before the reply was complete")

    def _choice(self, data: str) -> dict[str, Any] | None:
        """The first choice of one stream chunk (None for a chunk without choices, such as usage)."""
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if isinstance(chunk, dict) and "error" in chunk:
            raise self._client.error(f"{self._client.where} failed mid-reply: {server_error_detail(data)}")
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            raise self._client.error(
                f"{self._client.where} sent something that is not a chat completion chunk: {data[:80]!r}"
            )
        choices = chunk["choices"]
        return choices[0] if choices and isinstance(choices[0], dict) else None

    def warm_up(self) -> None:
        """One token, so a server that loads its model on first use (Ollama) has it loaded."""
        self._client.warm_up(
            lambda: list(
                self._client.stream(lambda: self._deltas(WARM_UP_MESSAGES, 1), lambda: False, self._first_token)
            )
        )

    def describe(self) -> dict[str, object]:
        s = self._settings
        return {
            **self._client.describe(),
            "sampling": f"temperature {s.temperature:g}, top_p {s.top_p:g}, max_tokens {s.max_tokens}",
            "first_token_timeout_s": s.first_token_timeout_s,
            "max_history_tokens": f"{s.max_history_tokens} (estimated at {CHARS_PER_TOKEN} characters a token)",
            "why": "llm.engine = 'openai': replies come from this server",
        }

    def close(self) -> None:
        self._client.close()


def chat_messages(
    persona: Persona, history: Sequence[ChatMessage], budget: int, context: str = ""
) -> list[dict[str, str]]:
    """The persona as a system message and example exchanges, then the recent conversation, its last
    question preceded by ``context`` (passages to answer from) when there is any."""
    system = [{"role": "system", "content": persona.system_prompt.strip()}] if persona.system_prompt.strip() else []
    examples = [
        {"role": role, "content": text}
        for question, answer in persona.examples
        for role, text in (("user", question), ("assistant", answer))
    ]
    recent = [{"role": m.role, "content": m.text} for m in recent_history(history, budget)]
    if context.strip() and recent and recent[-1]["role"] == "user":
        recent[-1]["content"] = question_with_context(recent[-1]["content"], context)
    return [*system, *examples, *recent]


def estimated_tokens(message: ChatMessage) -> int:
    return math.ceil(len(message.text) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE


def recent_history(history: Sequence[ChatMessage], budget: int) -> Sequence[ChatMessage]:
    """The latest messages within ``budget`` estimated tokens: whole exchanges are dropped from the
    oldest, so the kept part starts with a user message; the last message is always kept."""
    costs = [estimated_tokens(m) for m in history]
    start, total = 0, sum(costs)
    while total > budget and start < len(history) - 1:
        total -= costs[start]
        start += 1
        while start < len(history) - 1 and history[start].role != "user":
            total -= costs[start]
            start += 1
    return history[start:]

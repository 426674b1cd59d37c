"""A persona's reply to OpenAI-style chat messages, through the LLM engine's own interface.

System (and developer) messages are added to the persona's prompt; user and assistant messages are the
conversation, which must end with the user's. ``max_tokens`` caps the reply in the engine's deltas (one
token each for the embedded engine); the engine's own ``llm.max_tokens`` caps it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from engines.base import ChatMessage, LLMEngine, Persona
from media_server.config import DeadlineSettings
from media_server.conversation.deadlines import StageTimeout
from media_server.conversation.replying import timed_llm_deltas
from media_server.service.errors import BadInput, EngineFailed, EngineTimedOut
from media_server.sessions.messages import UNSPEAKABLE

SYSTEM_ROLES = ("system", "developer")
CONVERSATION_ROLES = ("user", "assistant")


def message_text(content: object, index: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    text: str | None = None
    if isinstance(content, str):
        text = content
    elif isinstance(content, list) and all(isinstance(part, dict) for part in content):
        if all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            text = "".join(part["text"] for part in content)
    if text is None:
        raise BadInput(f"messages[{index}].content must be a string or a list of text parts")
    if UNSPEAKABLE.search(text):
        raise BadInput(f"messages[{index}].content holds control characters or invalid Unicode; send plain text")
    return text


def conversation(messages: object, max_chars: int) -> tuple[str, list[ChatMessage]]:
    """(the system messages' text, the conversation) of OpenAI chat ``messages``; BadInput saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise BadInput('"messages" must be a non-empty list of {"role", "content"} objects')
    system: list[str] = []
    history: list[ChatMessage] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadInput(f"messages[{index}] must be an object with role and content")
        role, text = message.get("role"), message_text(message.get("content"), index)
        if role in SYSTEM_ROLES:
            system.append(text.strip())
        elif role in CONVERSATION_ROLES:
            history.append(ChatMessage(role, text))
        else:
            roles = ", ".join(SYSTEM_ROLES + CONVERSATION_ROLES)
            raise BadInput(f"messages[{index}].role {str(role)[:40]!r} is not one of {roles}")
    if sum(len(text) for text in system) + sum(len(m.text) for m in history) > max_chars:
        raise BadInput(f"the messages hold more than {max_chars} characters, the limit (api.max_text_chars)")
    if not history or history[-1].role != "user" or not history[-1].text.strip():
        raise BadInput("the last message must be the user's, with some text")
    return " ".join(text for text in system if text), history


def with_instructions(persona: Persona, instructions: str) -> Persona:
    if not instructions:
        return persona
    return dataclasses.replace(persona, system_prompt=f"{persona.system_prompt.strip()} {instructions}".strip())


class Reply:
    """A reply's deltas as they come (``async for``); afterwards ``finish_reason`` is "stop" or "length"."""

    def __init__(
        self,
        llm: LLMEngine,
        persona: Persona,
        history: list[ChatMessage],
        deadlines: DeadlineSettings,
        max_tokens: int | None,
    ) -> None:
        self._deltas = timed_llm_deltas(llm, persona, history, deadlines)
        self.max_tokens = max_tokens
        self.finish_reason = "stop"

    async def __aiter__(self) -> AsyncIterator[str]:
        count = 0
        try:
            async for delta in self._deltas:
                yield delta
                count += 1
                if self.max_tokens is not None and count >= self.max_tokens:
                    self.finish_reason = "length"
                    break
        except StageTimeout as error:
            raise EngineTimedOut(str(error)) from None
        except Exception as error:  # an engine's own failure (a remote server, a broken model), in its words
            raise EngineFailed(f"the llm engine failed: {error}") from None
        finally:
            await self._deltas.aclose()

    async def text(self) -> str:
        return "".join([delta async for delta in self])

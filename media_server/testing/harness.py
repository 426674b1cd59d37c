"""What the tests drive directly: a conversation and its avatar output without a session or a peer, and a
runtime's server on a free port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from engines.avatar import Avatar
from engines.base import EngineSet, Persona
from media_server.config import Settings
from media_server.conversation.conversation import Conversation
from media_server.conversation.events import Event
from media_server.conversation.knowledge import Retriever
from media_server.conversation.persona import PersonaProfile
from media_server.http.app import create_app
from media_server.http.state import SESSIONS
from media_server.media.timeline import AvatarOutput
from media_server.metrics import ServerMetrics
from media_server.runtime import Runtime

SECTIONS = ("turn_taking", "reply", "memory", "echo", "deadlines", "media")


def settings_with(settings: Settings, **changes: object) -> Settings:
    """``settings`` with each change made in the section that has that key (e.g. ``speak_ahead_s=1.0``)."""
    updates: dict[str, object] = {}
    for key, value in changes.items():
        section = next(name for name in SECTIONS if key in type(getattr(settings, name)).model_fields)
        current = updates.get(section, getattr(settings, section))
        updates[section] = current.model_copy(update={key: value})  # type: ignore[attr-defined]
    return settings.model_copy(update=updates)


@dataclass
class BareConversation:
    conversation: Conversation
    output: AvatarOutput
    events: list[dict[str, object]] = field(default_factory=list)

    async def close(self) -> None:
        await self.conversation.close()
        self.output.close()


def bare_conversation(
    settings: Settings,
    engines: EngineSet,
    avatar: Avatar,
    persona: Persona | PersonaProfile,
    voice: str,
    knowledge: Retriever | None = None,
) -> BareConversation:
    """A conversation whose events are kept as the JSON objects a client would receive (a bare Persona
    gets a profile with nothing around it: no greeting, no knowledge bases)."""
    output = AvatarOutput(engines.lipsync, avatar, settings.media, "test")
    events: list[dict[str, object]] = []

    def keep(event: Event) -> None:
        events.append(event.to_dict())

    conversation = Conversation(
        engines=engines,
        settings=settings,
        persona=persona if isinstance(persona, PersonaProfile) else PersonaProfile(persona, knowledge=()),
        voice=voice,
        output=output,
        metrics=ServerMetrics(),
        emit=keep,
        knowledge=knowledge,
    )
    return BareConversation(conversation, output, events)


@contextlib.asynccontextmanager
async def served(runtime: Runtime) -> AsyncIterator[tuple[str, web.Application]]:
    """``runtime``'s server on a free port of this machine: (its base URL, its app); its sessions are closed after."""
    app = create_app(runtime)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", app
    finally:
        await app[SESSIONS].close_all()
        await runner.cleanup()

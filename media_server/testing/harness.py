"""What the tests drive directly: a conversation and its avatar output without a session or a peer (on
scripted engines: ``Scripted``), and a runtime's server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web

from engines.avatar import Avatar
from engines.base import EngineSet, Persona
from media_server.config import Settings, load_settings
from media_server.conversation.conversation import Conversation
from media_server.conversation.events import Event
from media_server.conversation.knowledge import Retriever
from media_server.conversation.persona import PersonaProfile
from media_server.http.app import create_app
from media_server.http.state import SESSIONS
from media_server.media.timeline import AvatarOutput
from media_server.metrics import ServerMetrics
from media_server.runtime import Runtime
from media_server.testing.fakes import (
    FixedASR,
    ScriptedKnowledge,
    ScriptedLLM,
    ScriptedVAD,
    ToneTTS,
    blank_avatar,
    picture_number,
    scripted_engines,
)
from media_server.testing.servers import served

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
async def runtime_served(runtime: Runtime) -> AsyncIterator[tuple[str, web.Application]]:
    """``runtime``'s server on a free port of this machine: (its base URL, its app); its sessions are closed after."""
    app = create_app(runtime)
    async with served(app) as base_url:
        try:
            yield base_url, app
        finally:
            await app[SESSIONS].close_all()


PERSONA = Persona("tester", "Tester", "A test persona.")
WINDOW = np.zeros(ScriptedVAD.window_samples, np.float32)


class Scripted:
    """A bare conversation on scripted engines, with the test's hands on its microphone and its clock."""

    def __init__(
        self,
        llm: ScriptedLLM | None = None,
        tts: ToneTTS | None = None,
        asr: FixedASR | None = None,
        persona: Persona | PersonaProfile = PERSONA,
        knowledge: ScriptedKnowledge | None = None,
        **changes: object,
    ) -> None:
        self.vad, self.asr = ScriptedVAD(), asr or FixedASR()
        self.llm, self.tts = llm or ScriptedLLM(), tts or ToneTTS()
        engines = scripted_engines(vad=self.vad, asr=self.asr, llm=self.llm, tts=self.tts)
        settings = settings_with(load_settings(None, {}, environ={}), **changes)
        self.bare: BareConversation = bare_conversation(settings, engines, blank_avatar(), persona, "tone", knowledge)
        self.conversation, self.output, self.events = self.bare.conversation, self.bare.output, self.bare.events
        self.pictures: list[int] = []
        self.output.add_frame_listener(self._seen)

    def _seen(self, picture: np.ndarray | None, audio: np.ndarray) -> None:
        if picture is not None:  # None: the picture did not change
            self.pictures.append(picture_number(picture))

    async def hear(self, seconds: float, probability: float = 0.9, tick: bool = False) -> None:
        """The user is heard for ``seconds`` (voice, or silence at a low probability), window by window; with
        ``tick``, the output plays in step, a tick per 40 ms of microphone audio."""
        heard = 0.0
        for _ in range(self.vad.speak(seconds, probability)):
            self.conversation.listener.on_window(WINDOW, time.monotonic())
            heard += ScriptedVAD.window_samples / ScriptedVAD.sample_rate
            while tick and heard >= 1 / self.output.fps:
                heard -= 1 / self.output.fps
                await self.output.play_tick()
            await asyncio.sleep(0)

    async def until(self, condition: Callable[[], bool], ticking: bool = False, timeout: float = 5.0) -> None:
        """Let the conversation work (and the clock tick, with ``ticking``) until ``condition()``."""
        async with asyncio.timeout(timeout):
            while not condition():
                if ticking:
                    await self.output.play_tick()
                await asyncio.sleep(0.002)

    def types(self) -> list[str]:
        return [describe(event) for event in self.events]

    def has(self, description: str) -> Callable[[], bool]:
        return lambda: description in self.types()

    async def close(self) -> None:
        await self.bare.close()


def describe(event: dict[str, object]) -> str:
    if event["type"] == "state":
        return f"state:{event['state']}"
    if event["type"] == "reply":
        return "reply:final" + (":interrupted" if event.get("interrupted") else "") if event["final"] else "reply:delta"
    if event["type"] == "transcript":
        return "transcript:" + ("typed" if event.get("typed") else "final" if event["final"] else "partial")
    if event["type"] == "metrics":
        return "metrics:latency" if "latency_ms" in event else "metrics:gap"
    return str(event["type"])

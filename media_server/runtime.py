"""Everything one server process loads once and shares: engines, avatars, personas, knowledge bases."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import cv2

from engines.avatar import AvatarCatalogue
from engines.base import Engine, EngineConfigError, EngineLoadError, EngineSet, Persona
from engines.knowledge import check_name
from engines.registry import create_engine
from media_server.config import Settings
from media_server.conversation.knowledge import Knowledge
from media_server.conversation.persona import PersonaProfile

log = logging.getLogger(__name__)


STAGES = ("vad", "asr", "llm", "tts", "lipsync", "enhancer")


def build_engines(settings: Settings, warm_up: bool = True) -> EngineSet:
    """Load every configured stage in order, each announced before it starts.

    The announcement is logged before any of the stage's native code runs, so a crash inside a native
    library (which no Python handler can catch) still leaves the stage it happened in on record,
    followed by the fault handler's traceback (``facecast`` enables it).
    """
    loaded: dict[str, Engine] = {}
    for stage in STAGES:
        section = getattr(settings, stage)
        if section is None:
            continue
        log.info("loading %s engine %r", stage, section.engine)
        started = time.perf_counter()
        try:
            engine = create_engine(stage, section.engine, section.options)
            loaded[stage] = engine
            if warm_up:
                engine.warm_up()
        except EngineConfigError:
            _close_all(loaded)
            raise
        except Exception as error:
            _close_all(loaded)
            raise EngineLoadError(f"the {stage} engine {section.engine!r} failed to load: {error}") from error
        log.info("%s engine %r ready in %.2f s", stage, section.engine, time.perf_counter() - started)
    engines = EngineSet(**loaded)
    if engines.enhancer is not None:
        engines.lipsync.use_enhancer(engines.enhancer)
    engines.descriptions = {
        stage: {"engine": getattr(settings, stage).engine, **engine.describe()} for stage, engine in loaded.items()
    }
    return engines


def _close_all(engines: dict[str, Engine]) -> None:
    for engine in reversed(engines.values()):
        engine.close()


def personas_from(settings: Settings) -> dict[str, Persona]:
    """Each persona as the LLM reads it."""
    return {
        name: Persona(
            name=name,
            display_name=p.display_name,
            system_prompt=p.system_prompt,
            examples=tuple((q, a) for q, a in p.examples),
            language=p.language,
        )
        for name, p in settings.personas.items()
    }


def profiles_from(settings: Settings) -> dict[str, PersonaProfile]:
    """Each persona as a conversation uses it; EngineConfigError for a knowledge base no base could be called."""
    profiles = {}
    for name, persona in personas_from(settings).items():
        p = settings.personas[name]
        try:
            knowledge = None if p.knowledge is None else tuple(check_name(base) for base in p.knowledge)
        except ValueError as error:
            raise EngineConfigError(f"personas.{name}.knowledge: {error}") from error
        profiles[name] = PersonaProfile(
            persona=persona,
            detect_language=p.detect_language,
            greeting=p.greeting or "",
            not_heard=p.not_heard or "",
            slower_phrases=tuple(p.slower_phrases),
            knowledge=knowledge,
        )
    return profiles


def load_knowledge(settings: Settings, profiles: dict[str, PersonaProfile]) -> Knowledge:
    """The knowledge bases, with the embedding model loaded now when a persona answers from a base that
    exists (else it loads with the first document added). Bases a persona names that do not exist yet
    are logged: documents added to them later are used at once."""
    knowledge = Knowledge(settings.knowledge)
    existing = set(knowledge.names())
    for profile in profiles.values():
        if missing := [base for base in profile.knowledge or () if base not in existing]:
            log.warning(
                "persona %r answers from knowledge bases that do not exist yet: %s (facecast knowledge add NAME FILE)",
                profile.name,
                ", ".join(missing),
            )
    if any(base in existing for profile in profiles.values() for base in profile.knowledge_bases):
        log.info("loading the knowledge bases' embedding model %r", settings.knowledge.model)
        knowledge.library()
    return knowledge


@dataclass
class Runtime:
    settings: Settings
    engines: EngineSet
    avatars: AvatarCatalogue
    personas: dict[str, PersonaProfile]
    knowledge: Knowledge

    @classmethod
    def load(cls, settings: Settings, warm_up: bool = True) -> Runtime:
        # The sessions are the server's parallelism. OpenCV splitting every frame of every session
        # across a pool of its own only adds workers that spin, waiting for the next frame.
        cv2.setNumThreads(1)
        personas = profiles_from(settings)
        engines = build_engines(settings, warm_up)
        try:
            avatars = AvatarCatalogue(settings.server.avatars_dir)
            default = avatars.get(settings.server.default_avatar)
            engines.lipsync.prepare(default)
            knowledge = load_knowledge(settings, personas)
            if warm_up:
                engines.llm.prepare(personas[settings.server.default_persona].persona)
        except BaseException:
            engines.close()
            raise
        return cls(settings, engines, avatars, personas, knowledge)

    def voice_for(self, persona: str) -> str:
        """The persona's voice: its own, else the TTS engine's voice for its language, else the default voice."""
        tts = self.engines.tts
        language = self.personas[persona].language
        return self.settings.personas[persona].voice or tts.voice_for_language(language) or tts.default_voice

    def close(self) -> None:
        self.engines.close()
        self.knowledge.close()

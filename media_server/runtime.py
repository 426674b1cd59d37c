"""Everything one server process loads once and shares: engines, avatars, personas."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from engines.avatar import AvatarCatalogue
from engines.base import EngineSet, Persona
from engines.registry import create_engine
from media_server.config import Settings

log = logging.getLogger(__name__)


def build_engines(settings: Settings, warm_up: bool = True) -> EngineSet:
    def make(stage: str):  # noqa: ANN202 - the type is the stage's interface
        section = getattr(settings, stage)
        started = time.perf_counter()
        engine = create_engine(stage, section.engine, section.options)
        if warm_up:
            engine.warm_up()
        log.info("%s engine %r ready in %.2f s", stage, section.engine, time.perf_counter() - started)
        return engine

    engines = EngineSet(
        vad=make("vad"),
        asr=make("asr"),
        llm=make("llm"),
        tts=make("tts"),
        lipsync=make("lipsync"),
        enhancer=make("enhancer") if settings.enhancer is not None else None,
    )
    if engines.enhancer is not None:
        engines.lipsync.use_enhancer(engines.enhancer)
    engines.descriptions = {
        stage: {"engine": getattr(settings, stage).engine, **engine.describe()}
        for stage, engine in (
            ("vad", engines.vad),
            ("asr", engines.asr),
            ("llm", engines.llm),
            ("tts", engines.tts),
            ("lipsync", engines.lipsync),
            ("enhancer", engines.enhancer),
        )
        if engine is not None
    }
    return engines


def personas_from(settings: Settings) -> dict[str, Persona]:
    return {
        name: Persona(
            name=name,
            display_name=p.display_name,
            system_prompt=p.system_prompt,
            examples=tuple((q, a) for q, a in p.examples),
        )
        for name, p in settings.personas.items()
    }


@dataclass
class Runtime:
    settings: Settings
    engines: EngineSet
    avatars: AvatarCatalogue
    personas: dict[str, Persona]

    @classmethod
    def load(cls, settings: Settings, warm_up: bool = True) -> Runtime:
        engines = build_engines(settings, warm_up)
        avatars = AvatarCatalogue(settings.server.avatars_dir)
        default = avatars.get(settings.server.default_avatar)
        engines.lipsync.prepare(default)
        personas = personas_from(settings)
        if warm_up:
            engines.llm.prepare(personas[settings.server.default_persona])
        return cls(settings, engines, avatars, personas)

    def voice_for(self, persona: str) -> str:
        return self.settings.personas[persona].voice or self.engines.tts.default_voice

"""Everything one server process loads once and shares: engines, avatars, personas."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import cv2

from engines.avatar import AvatarCatalogue
from engines.base import Engine, EngineConfigError, EngineLoadError, EngineSet, Persona
from engines.registry import create_engine
from media_server.config import Settings

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
        # The sessions are the server's parallelism. OpenCV splitting every frame of every session
        # across a pool of its own only adds workers that spin, waiting for the next frame.
        cv2.setNumThreads(1)
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

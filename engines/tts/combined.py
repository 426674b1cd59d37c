"""Several TTS engines as one: each voice is spoken by the engine that has it.

The default configuration combines Piper's English voice with espeak-ng's voices for about a hundred
languages, so personas in any of them have an offline voice. A persona without a voice of its own
gets the first engine's voice for its language (``voice_for_language``), so English stays Piper's.
An option set beside ``engines`` (``tts.reply_timeout_s = 4``) applies to every engine that has it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

from pydantic import ConfigDict, Field, field_validator

from engines.base import EngineConfigError, EngineSettings, SpeechChunk, TTSEngine
from engines.registry import create_engine, engine_class

ENGINE = "combined"


class CombinedTTS(TTSEngine):
    class Settings(EngineSettings):
        model_config = ConfigDict(extra="allow")  # options for every engine that has them
        # Each: {engine = NAME, ...that engine's own options}, in the order voices are looked for.
        engines: list[dict[str, Any]] = Field(
            default_factory=lambda: [{"engine": "piper"}, {"engine": "espeak"}], min_length=1
        )
        default_voice: str | None = None  # unset: the first engine's default voice

        @field_validator("engines")
        @classmethod
        def _named_engines(cls, engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
            for part in engines:
                name = part.get("engine")
                if not isinstance(name, str):
                    raise ValueError(f"each of tts.engines needs an engine name (engine = 'piper'); got {part}")
                if name == ENGINE:
                    raise ValueError("tts.engines cannot hold another combined engine")
            return engines

    def __init__(self, settings: Settings) -> None:
        shared = dict(settings.model_extra or {})
        fields = {
            part["engine"]: engine_class("tts", part["engine"]).Settings.model_fields for part in settings.engines
        }
        if unused := [key for key in shared if not any(key in known for known in fields.values())]:
            raise EngineConfigError(f"tts.{unused[0]}: none of the engines ({', '.join(fields)}) has this option")
        self._parts: list[tuple[str, TTSEngine]] = []
        try:
            for part in settings.engines:
                name = part["engine"]
                options = {key: value for key, value in shared.items() if key in fields[name]}
                options.update((key, value) for key, value in part.items() if key != "engine")
                self._parts.append((name, cast(TTSEngine, create_engine("tts", name, options))))
            self._owners = self._voice_owners()
            self._default_voice = settings.default_voice or self._parts[0][1].default_voice
            if self._default_voice not in self._owners:
                raise EngineConfigError(
                    f"tts.default_voice {self._default_voice!r} is none of the voices: {', '.join(self._owners)}"
                )
        except BaseException:
            self.close()
            raise

    def _voice_owners(self) -> dict[str, TTSEngine]:
        owners: dict[str, TTSEngine] = {}
        names: dict[str, str] = {}
        for name, engine in self._parts:
            for voice in engine.voices:
                if voice in owners:
                    raise EngineConfigError(
                        f"tts.engines: the voice {voice!r} is in both {names[voice]} and {name}: give one of them another name"
                    )
                owners[voice], names[voice] = engine, name
        return owners

    @property
    def voices(self) -> list[str]:
        return list(self._owners)

    def engine_for(self, voice: str) -> TTSEngine:
        """The engine that speaks ``voice``."""
        owner = self._owners.get(voice)
        if owner is None:
            raise ValueError(f"unknown voice {voice!r}; available voices: {', '.join(self._owners)}")
        return owner

    @property
    def default_voice(self) -> str:
        return self._default_voice

    def synthesize(self, text: str, voice: str, speed: float = 1.0) -> Iterator[SpeechChunk]:
        return self.engine_for(voice).synthesize(text, voice, speed)

    def voice_for_language(self, language: str) -> str | None:
        return next(
            (voice for _, engine in self._parts if (voice := engine.voice_for_language(language)) is not None), None
        )

    def warm_up(self) -> None:
        for _, engine in self._parts:
            engine.warm_up()

    def describe(self) -> dict[str, object]:
        """Every voice with what its engine tells of it, then each engine's own description."""
        described = [(name, engine.describe()) for name, engine in self._parts]
        voices: dict[str, object] = {}
        for _, description in described:
            voices.update(cast(dict[str, object], description.pop("voices", {})))
        return {
            "voices": voices,
            "default_voice": self._default_voice,
            "engines": [{"engine": name, **description} for name, description in described],
            "why": "tts.engine = 'combined': each voice is spoken by the engine that has it",
        }

    def close(self) -> None:
        for _, engine in reversed(self._parts):
            engine.close()

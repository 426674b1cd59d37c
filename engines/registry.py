"""Engines are chosen by name in the configuration; this is the only place names map to modules.

Implementations are imported lazily, so the server never imports one it does not use
(and never imports a GPL one at all: the piper and espeak engines run theirs in worker processes).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from pydantic import ValidationError

from engines.base import Engine, EngineConfigError

IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "vad": {"silero": "engines.vad.silero:SileroVAD"},
    "asr": {
        "faster-whisper": "engines.asr.faster_whisper:FasterWhisperASR",
        "openai": "engines.asr.openai:OpenAIASR",
    },
    "llm": {
        "llama-cpp": "engines.llm.llama_cpp:LlamaCppLLM",
        "openai": "engines.llm.openai:OpenAILLM",
    },
    "tts": {
        "piper": "engines.tts.piper.engine:PiperTTS",
        "espeak": "engines.tts.espeak.engine:EspeakTTS",
        "openai": "engines.tts.openai:OpenAITTS",
        "combined": "engines.tts.combined:CombinedTTS",
    },
    "lipsync": {
        "warp": "engines.lipsync.warp:WarpLipSync",
        "wav2lip": "engines.lipsync.wav2lip.engine:Wav2LipSync",
    },
    "enhancer": {"gfpgan": "engines.enhancer.gfpgan.engine:GFPGANEnhancer"},
}


def engine_class(stage: str, name: str) -> type[Engine]:
    choices = IMPLEMENTATIONS.get(stage)
    if choices is None:
        raise EngineConfigError(f"unknown stage {stage!r}; stages are {', '.join(IMPLEMENTATIONS)}")
    target = choices.get(name)
    if target is None:
        raise EngineConfigError(f"unknown {stage} engine {name!r}; available: {', '.join(choices)}")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_engine(stage: str, name: str, options: Mapping[str, object]) -> Engine:
    """Build one engine from its name and its own options, validated by its Settings model."""
    cls = engine_class(stage, name)
    try:
        settings = cls.Settings.model_validate(dict(options))
    except ValidationError as error:
        problems = "; ".join(f"{stage}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise EngineConfigError(f"invalid settings for {stage} engine {name!r}: {problems}") from error
    return cls(settings)

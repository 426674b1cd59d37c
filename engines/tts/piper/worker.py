"""The piper worker process: the only Facecast code that imports piper.

piper-tts is GPL-3.0 and Facecast is Apache-2.0, so piper never runs in the server
process: ``engines.tts.piper.engine`` starts this module as
``python -m engines.tts.piper.worker CONFIG_JSON`` and talks to it over pipes
(the protocol is in ``engines.tts.worker_loop``).
CONFIG_JSON is ``{"voices": {name: onnx_path}, "length_scale": float, "onnx_threads": int,
"stream_sentences": bool}`` (false: each of espeak's clauses decoded whole, in one chunk).
Its ready message is ``{"event": "ready", "voices": {"joe": {"sample_rate": 22050,
"phoneme_timings": true, "streams": true}}}``.

A sentence comes in several chunks: the voice's model is cut in front of its decoder
(``engines.tts.piper.vits_streaming``), and the first ~0.28 s of a sentence is sent as soon as it is
decoded, then windows twice as long as the one before. Phoneme timings (seconds from the
chunk's start) come from the model's duration tensor; they are piper's phonemes (NFD
codepoints, stress marks included), "^" and "$" marking the leading and trailing silence.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from piper import PiperVoice
from piper.config import PiperConfig
from piper.const import BOS, EOS, PAD

from engines.tts.piper.vits_streaming import FIRST_WINDOW_FRAMES, open_vits, windows
from engines.tts.worker_loop import Piece, Speak, Timing, claim_stdout, serve_forever, split_sentences


def phoneme_timings(
    phonemes: list[str],
    phoneme_id_map: Mapping[str, Sequence[int]],
    frames_per_id: np.ndarray,
    seconds_per_frame: float,
) -> list[Timing] | None:
    """Each phoneme's (start, end) in seconds: its ids and the pad id after it (piper's id layout)."""
    pad_ids = len(phoneme_id_map.get(PAD, []))
    timings: list[Timing] = []
    index, frame = 0, 0
    for phoneme in [BOS, *phonemes, EOS]:
        count = len(phoneme_id_map.get(phoneme, [])) + (pad_ids if phoneme != EOS else 0)
        if index + count > len(frames_per_id):
            return None
        frames = int(frames_per_id[index : index + count].sum())
        timings.append((phoneme, frame * seconds_per_frame, (frame + frames) * seconds_per_frame))
        index, frame = index + count, frame + frames
    return timings if index == len(frames_per_id) else None


def timings_within(timings: list[Timing] | None, start: float, end: float) -> list[Timing] | None:
    """The phonemes heard in [start, end), in seconds from ``start``."""
    if timings is None:
        return None
    return [(p, max(s, start) - start, min(e, end) - start) for p, s, e in timings if e > start and s < end]


class Speaker:
    """One voice, speaking a sentence window by window (``engines.tts.piper.vits_streaming``).

    Piper normalises each sentence to its own peak, which needs the whole sentence first; a
    speaker instead applies one gain per voice, measured on a few sentences at load, so every
    window of every sentence is equally loud.
    """

    _CALIBRATION = ("Hello there.", "The capital of France is Paris.", "Yes, I think so, but I am not sure.")
    _PEAK = 0.95

    def __init__(self, model_path: str, onnx_threads: int, length_scale: float, first_window: int | None) -> None:
        config = json.loads(Path(f"{model_path}.json").read_text(encoding="utf-8"))
        self.config = PiperConfig.from_dict(config)
        self._length_scale = length_scale
        self._vits = open_vits(onnx.load(model_path), onnx_threads, self.config.hop_length)
        self._first_window = first_window if self._vits.can_stream else None
        # PiperVoice phonemizes; its own session (the whole model) is never run.
        self._voice = PiperVoice(session=None, config=self.config)  # type: ignore[arg-type]
        self._gain = 1.0
        peak = max(float(np.abs(audio).max()) for text in self._CALIBRATION for audio, _ in self.pieces(text))
        self._gain = self._PEAK / peak

    def describe(self) -> dict[str, Any]:
        return {
            "sample_rate": self.config.sample_rate,
            "phoneme_timings": self._vits.has_durations,
            "streams": self._first_window is not None,
        }

    def pieces(self, sentence: str, speed: float = 1.0) -> Iterator[tuple[np.ndarray, list[Timing] | None]]:
        """The sentence's audio, window by window, each with the phonemes heard in it.

        espeak may cut a sentence into clauses; their windows follow one another.
        """
        seconds_per_frame = self.config.hop_length / self.config.sample_rate
        for phonemes in self._voice.phonemize(sentence):
            if not phonemes:
                continue
            feeds = self._feeds(self._voice.phonemes_to_ids(phonemes), self._length_scale / speed)
            decoder_inputs, frames_per_id = self._vits.encode(feeds)
            timings = None
            if frames_per_id is not None:
                timings = phoneme_timings(phonemes, self.config.phoneme_id_map, frames_per_id, seconds_per_frame)
            for start, end in windows(self._vits.frames(decoder_inputs), self._first_window):
                audio = self._vits.decode(decoder_inputs, start, end)
                heard = timings_within(timings, start * seconds_per_frame, end * seconds_per_frame)
                yield np.clip(audio * self._gain, -1.0, 1.0).astype("<f4"), heard

    def _feeds(self, phoneme_ids: list[int], length_scale: float) -> dict[str, np.ndarray]:
        feeds = {
            "input": np.array([phoneme_ids], dtype=np.int64),
            "input_lengths": np.array([len(phoneme_ids)], dtype=np.int64),
            "scales": np.array(
                [self.config.noise_scale, length_scale, self.config.noise_w_scale], dtype=np.float32
            ),
        }
        if self.config.num_speakers > 1:
            feeds["sid"] = np.array([self.config.default_speaker_id], dtype=np.int64)
        return feeds


def speaking(speakers: Mapping[str, Speaker]) -> Speak:
    """Each sentence of a text, piece by piece, in the named voice."""

    def speak(text: str, voice: str, speed: float) -> Iterator[Piece]:
        speaker = speakers[voice]
        for sentence in split_sentences(text):
            for index, (audio, timings) in enumerate(speaker.pieces(sentence, speed)):
                yield Piece(sentence, index == 0, audio, speaker.config.sample_rate, timings)

    return speak


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    out = claim_stdout()
    first_window = FIRST_WINDOW_FRAMES if config["stream_sentences"] else None
    speakers = {
        name: Speaker(path, config["onnx_threads"], config["length_scale"], first_window)
        for name, path in config["voices"].items()
    }
    serve_forever(out, {"voices": {name: s.describe() for name, s in speakers.items()}}, speaking(speakers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The piper worker process: the only Facecast code that imports piper.

piper-tts is GPL-3.0 and Facecast is Apache-2.0, so piper never runs in the server
process: ``engines.tts_piper`` starts this module as
``python -m engines.tts_piper_worker CONFIG_JSON`` and talks to it over pipes.
CONFIG_JSON is ``{"voices": {name: onnx_path}, "length_scale": float, "onnx_threads": int}``.

Protocol. Requests arrive on stdin, one JSON object a line:

    {"op": "synthesize", "id": 7, "text": "...", "voice": "joe"}
    {"op": "abort", "id": 7}       # stop request 7 after the sentence being synthesised

Replies go to stdout, each a JSON header line, a chunk's header followed by its audio
as ``samples`` little-endian float32 values:

    {"event": "ready", "voices": {"joe": {"sample_rate": 22050, "phoneme_timings": false}}}  # once loaded
    {"event": "chunk", "id": 7, "text": "...", "sample_rate": 22050, "samples": N,
     "phonemes": [[phoneme, start_s, end_s], ...] | null}
    {"event": "done", "id": 7}                        # also after an abort
    {"event": "error", "id": 7, "message": "..."}

Requests are served one at a time, in order; a request's chunks come one per sentence.
Phoneme timings come only from models with a duration output; with the onnx package
installed the worker adds that output to standard piper models in memory. They are piper's
phonemes (NFD codepoints, stress marks included); "^" and "$" mark the leading and trailing
silence.
The worker exits when stdin closes.
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnxruntime
from piper import PiperVoice, SynthesisConfig
from piper.config import PiperConfig

# A sentence ends at . ! ? or … (optionally followed by a closing quote or bracket) before
# whitespace, or at a line break.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s+|\s*\n\s*")
# A break after one of these is not the end of a sentence ("Dr. Smith").
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|e\.g|i\.e)\.$", re.IGNORECASE)

Timing = tuple[str, float, float]


class _Aborts:
    """Ids of requests the server gave up on; written by the stdin reader, read between sentences."""

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._lock = threading.Lock()

    def add(self, request_id: int) -> None:
        with self._lock:
            self._ids.add(request_id)

    def contains(self, request_id: int) -> bool:
        with self._lock:
            return request_id in self._ids

    def forget_before(self, request_id: int) -> None:
        """Request ids only grow, so aborts of earlier requests can no longer matter."""
        with self._lock:
            self._ids = {i for i in self._ids if i >= request_id}


def split_sentences(text: str) -> list[str]:
    sentences: list[str] = []
    for part in _SENTENCE_BREAK.split(text):
        if not (sentence := part.strip()):
            continue
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] += " " + sentence
        else:
            sentences.append(sentence)
    return sentences


def model_source(model_path: str) -> str | bytes:
    """The model, patched in memory to output phoneme durations when the onnx package is installed.

    Piper's own ``include_alignments`` does the same, but PiperVoice.load offers no thread count.
    """
    try:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output
    except ImportError:
        return model_path
    model = onnx.load(model_path)
    try:
        add_alignment_output(model)
    except ValueError:  # no single duration tensor to expose, or the file is patched already
        return model_path
    return model.SerializeToString()


def load_voice(model_path: str, onnx_threads: int) -> PiperVoice:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = onnx_threads
    options.inter_op_num_threads = 1
    config = json.loads(Path(f"{model_path}.json").read_text(encoding="utf-8"))
    session = onnxruntime.InferenceSession(
        model_source(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return PiperVoice(session=session, config=PiperConfig.from_dict(config))


def describe_voice(voice: PiperVoice) -> dict[str, Any]:
    return {"sample_rate": voice.config.sample_rate, "phoneme_timings": len(voice.session.get_outputs()) > 1}


def synthesize_sentence(
    voice: PiperVoice, sentence: str, syn_config: SynthesisConfig
) -> tuple[np.ndarray, list[Timing] | None] | None:
    """A sentence's audio and, if the model outputs durations, its phoneme timings (None: nothing to say)."""
    sample_rate = voice.config.sample_rate
    parts: list[np.ndarray] = []
    timings: list[Timing] | None = []
    offset = 0
    # espeak may cut a sentence into several clauses; they are joined back into one chunk.
    for chunk in voice.synthesize(sentence, syn_config, include_alignments=True):
        if chunk.phoneme_alignments is None:
            timings = None
        elif timings is not None:
            position = offset
            for alignment in chunk.phoneme_alignments:
                end = position + int(alignment.num_samples)
                timings.append((alignment.phoneme, position / sample_rate, end / sample_rate))
                position = end
        parts.append(chunk.audio_float_array)
        offset += len(chunk.audio_float_array)
    if not parts:
        return None
    return np.concatenate(parts).astype("<f4"), timings


def write_message(out: BinaryIO, message: dict[str, Any], payload: bytes = b"") -> None:
    out.write(json.dumps(message).encode("utf-8") + b"\n" + payload)
    out.flush()


def serve(
    request: dict[str, Any],
    voices: dict[str, PiperVoice],
    syn_config: SynthesisConfig,
    aborts: _Aborts,
    out: BinaryIO,
) -> None:
    request_id = request["id"]
    aborts.forget_before(request_id)
    try:
        voice = voices[request["voice"]]
        for sentence in split_sentences(request["text"]):
            if aborts.contains(request_id):
                break
            result = synthesize_sentence(voice, sentence, syn_config)
            if result is None:
                continue
            audio, timings = result
            header = {
                "event": "chunk",
                "id": request_id,
                "text": sentence,
                "sample_rate": voice.config.sample_rate,
                "samples": len(audio),
                "phonemes": timings,
            }
            write_message(out, header, audio.tobytes())
    except Exception as error:  # one bad request must not take the worker down
        traceback.print_exc()
        write_message(out, {"event": "error", "id": request_id, "message": f"{type(error).__name__}: {error}"})
        return
    write_message(out, {"event": "done", "id": request_id})


def read_requests(source: BinaryIO, requests: queue.SimpleQueue[dict[str, Any] | None], aborts: _Aborts) -> None:
    """Runs beside synthesis so an abort is seen while a request is still being served."""
    for line in source:
        request = json.loads(line)
        if request["op"] == "abort":
            aborts.add(request["id"])
        else:
            requests.put(request)
    requests.put(None)


def claim_stdout() -> BinaryIO:
    """Keep fd 1 for the protocol alone: anything else printing to stdout (espeak, onnxruntime) goes to stderr."""
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    out = claim_stdout()
    voices = {name: load_voice(path, config["onnx_threads"]) for name, path in config["voices"].items()}
    syn_config = SynthesisConfig(length_scale=config["length_scale"])
    write_message(out, {"event": "ready", "voices": {name: describe_voice(v) for name, v in voices.items()}})

    requests: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    aborts = _Aborts()
    threading.Thread(target=read_requests, args=(sys.stdin.buffer, requests, aborts), daemon=True).start()
    while (request := requests.get()) is not None:
        serve(request, voices, syn_config, aborts, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

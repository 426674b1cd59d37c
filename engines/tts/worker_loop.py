"""The request loop every TTS worker process runs (``engines.tts.worker_process`` starts them).

A worker is started as ``python -m MODULE CONFIG_JSON``, loads its synthesiser, says so, and
then serves requests until its stdin closes. This module imports nothing GPL: each worker module
loads its own synthesiser and hands ``serve_forever`` a function that speaks.

Protocol. Requests arrive on stdin, one JSON object a line:

    {"op": "synthesize", "id": 7, "text": "...", "voice": "joe", "speed": 1.0}   # speed: > 1 faster
    {"op": "abort", "id": 7}       # stop request 7 after the piece being synthesised

Replies go to stdout, each a JSON header line, a chunk's header followed by its audio
as ``samples`` little-endian float32 values:

    {"event": "ready", ...}          # once loaded; the rest is what the worker module reports
    {"event": "chunk", "id": 7, "text": "<the sentence>", "starts_sentence": true, "sample_rate": 22050,
     "samples": N, "phonemes": [[phoneme, start_s, end_s], ...] | null}
    {"event": "done", "id": 7}                        # also after an abort
    {"event": "error", "id": 7, "message": "..."}

Requests are served one at a time, in order; a sentence may come in several chunks, each
carrying the sentence's text.
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

# A sentence ends at . ! ? or … (optionally followed by a closing quote or bracket) before
# whitespace, or at a line break.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s+|\s*\n\s*")
# A break after one of these is not the end of a sentence: "Dr. Smith", and a single letter or
# digit ("J. K. Rowling", "e.g. this", German "z. B." and "am 3. Mai").
_ABBREVIATION = re.compile(r"\b(?:\w|Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs)\.$", re.IGNORECASE)

Timing = tuple[str, float, float]


@dataclass(frozen=True)
class Piece:
    """Audio of a sentence, or of a piece of one."""

    sentence: str
    starts_sentence: bool
    audio: np.ndarray  # float32 mono
    sample_rate: int
    phonemes: list[Timing] | None = None  # seconds from the piece's start


# Speaks (text, voice, speed) piece by piece; raises for a voice it does not have.
Speak = Callable[[str, str, float], Iterator[Piece]]


class _Aborts:
    """Ids of requests the server gave up on; written by the stdin reader, read between pieces."""

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


def write_message(out: BinaryIO, message: dict[str, Any], payload: bytes = b"") -> None:
    out.write(json.dumps(message).encode("utf-8") + b"\n" + payload)
    out.flush()


def _serve(request: dict[str, Any], speak: Speak, aborts: _Aborts, out: BinaryIO) -> None:
    request_id = request["id"]
    aborts.forget_before(request_id)
    try:
        for piece in speak(request["text"], request["voice"], request.get("speed", 1.0)):
            if aborts.contains(request_id):
                break
            audio = np.asarray(piece.audio, dtype="<f4")
            header = {
                "event": "chunk",
                "id": request_id,
                "text": piece.sentence,
                "starts_sentence": piece.starts_sentence,
                "sample_rate": piece.sample_rate,
                "samples": len(audio),
                "phonemes": piece.phonemes,
            }
            write_message(out, header, audio.tobytes())
    except Exception as error:  # one bad request must not take the worker down
        traceback.print_exc()
        write_message(out, {"event": "error", "id": request_id, "message": f"{type(error).__name__}: {error}"})
        return
    write_message(out, {"event": "done", "id": request_id})


def _read_requests(source: BinaryIO, requests: queue.SimpleQueue[dict[str, Any] | None], aborts: _Aborts) -> None:
    """Runs beside synthesis so an abort is seen while a request is still being served."""
    for line in source:
        request = json.loads(line)
        if request["op"] == "abort":
            aborts.add(request["id"])
        else:
            requests.put(request)
    requests.put(None)


def claim_stdout() -> BinaryIO:
    """Keep fd 1 for the protocol alone: anything else printing to stdout (espeak, onnxruntime) goes to stderr.

    Call it first, before the synthesiser loads."""
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


def serve_forever(out: BinaryIO, ready: dict[str, Any], speak: Speak) -> None:
    """Say the worker is ready (with ``ready``'s details), then serve requests until stdin closes."""
    write_message(out, {"event": "ready", **ready})
    requests: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    aborts = _Aborts()
    threading.Thread(target=_read_requests, args=(sys.stdin.buffer, requests, aborts), daemon=True).start()
    while (request := requests.get()) is not None:
        _serve(request, speak, aborts, out)

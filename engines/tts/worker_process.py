"""Speech synthesisers that run in worker processes, spoken to over pipes.

piper-tts and espeak-ng are GPL-3.0 and Facecast is Apache-2.0, so neither is ever loaded into
the server process: each worker is a separate Python process running a worker module (its pipe
protocol is in ``engines.tts.worker_loop``), and only that process loads the synthesiser. Every
worker serves one request at a time; requests go to the worker with the fewest requests outstanding,
and a worker that died is started again for the next request.

Replies are routed by request id, so chunks of an abandoned request (closed iterator on
barge-in) are dropped and never reach a later request.

A worker that has work and sends nothing for ``reply_timeout_s`` is hung (stopped, deadlocked):
it is killed, its requests fail with an error saying so, and a warm spare takes its place at once,
so one stuck worker never silences every session it serves.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from queue import SimpleQueue
from typing import IO, Any

import numpy as np
from pydantic import Field

from engines import PROJECT_ROOT
from engines.base import EngineSettings, PhonemeTiming, SpeechChunk, TTSEngine

logger = logging.getLogger(__name__)
POLL_S = 0.25  # how often a waiting request checks whether its worker is still making progress


class WorkerSettings(EngineSettings):
    """What every engine run in worker processes is configured with."""

    workers: int = Field(1, ge=1, description="worker processes serving requests")
    spare_workers: int = Field(1, ge=0, le=1, description="a started worker waiting to replace one that dies")
    reply_timeout_s: float = Field(8.0, gt=0, description="a worker with work that sends nothing this long is hung")


class TTSWorkerError(RuntimeError):
    """A TTS worker failed a request or died while serving it."""


@dataclass(frozen=True)
class _Failure:
    message: str


# What a request's queue receives: a chunk, a failure, or None once the request is complete.
_Reply = SpeechChunk | _Failure | None


@dataclass(frozen=True)
class WorkerKind:
    """Which module a worker runs, and how its logs and errors name it."""

    module: str  # run as ``python -m MODULE CONFIG_JSON``
    label: str  # "piper": "the piper worker exited ..."
    error: type[TTSWorkerError] = TTSWorkerError


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


class WorkerProcess:
    """One worker process: sends requests, and routes its replies to each request's queue by id."""

    def __init__(self, kind: WorkerKind, config_json: str) -> None:
        self.kind = kind
        self._process = subprocess.Popen(
            [sys.executable, "-m", kind.module, config_json],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_worker_environment(),
        )
        self._lock = threading.Lock()
        self._pending: dict[int, SimpleQueue[_Reply]] = {}
        self._progress_at = time.monotonic()  # its last reply, or when it was last given work while idle
        self._kill_reason: str | None = None
        self._exit_message: str | None = None
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._stderr_thread = threading.Thread(target=self._pump_stderr, daemon=True)
        self._stderr_thread.start()
        self.ready_info: dict[str, Any] = {}

    def wait_until_ready(self) -> None:
        """Block until the worker has loaded its synthesiser (workers started together load in parallel)."""
        ready = _read_message(self._stdout)
        if ready is None:
            self.close()
            raise self.kind.error(f"the {self.kind.label} worker failed to start: {self._exit_description()}")
        self.ready_info = ready[0]
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
                raise self.kind.error(self._exit_message)
            if not self._pending:
                self._progress_at = time.monotonic()
            self._pending[request_id] = replies
            self._send({"op": "synthesize", "id": request_id, "text": text, "voice": voice, "speed": speed})
        return replies

    def abort(self, request_id: int) -> None:
        """Stop a request after the piece it is synthesising; whatever it still sends is dropped."""
        with self._lock:
            if self._pending.pop(request_id, None) is not None:
                self._send({"op": "abort", "id": request_id})

    def stalled_for(self) -> float:
        """Seconds the worker has had work without sending anything (0 when it has none)."""
        with self._lock:
            return time.monotonic() - self._progress_at if self._pending else 0.0

    def kill(self, reason: str) -> None:
        """Stop a hung worker at once; its requests then fail with ``reason``."""
        with self._lock:
            self._kill_reason = self._kill_reason or reason
        logger.warning("killing %s worker %d: %s", self.kind.label, self.pid, reason)
        self._process.kill()

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
        exit_message = f"the {self.kind.label} worker exited while synthesising: {self._exit_description()}"
        if self._kill_reason is not None:
            exit_message = f"the {self.kind.label} worker {self._kill_reason}; it was replaced"
        with self._lock:
            self._exit_message = exit_message
            pending = list(self._pending.values())
            self._pending.clear()
        for replies in pending:
            replies.put(_Failure(exit_message))

    def _dispatch(self, header: dict[str, Any], payload: bytes) -> None:
        event, request_id = header["event"], header["id"]
        with self._lock:
            self._progress_at = time.monotonic()
            replies = self._pending.get(request_id) if event == "chunk" else self._pending.pop(request_id, None)
        if replies is None:
            return  # an aborted request
        if event == "chunk":
            replies.put(_speech_chunk(header, payload))
        elif event == "error":
            replies.put(_Failure(f"{self.kind.label} failed: {header['message']}"))
        else:
            replies.put(None)

    def _pump_stderr(self) -> None:
        assert self._process.stderr is not None
        for raw_line in self._process.stderr:
            line = raw_line.decode("utf-8", "replace").rstrip()
            self._stderr_tail.append(line)
            logger.info("%s worker %d: %s", self.kind.label, self._process.pid, line)

    def _exit_description(self) -> str:
        self._stderr_thread.join(timeout=1)  # its last lines usually say why the worker exited
        code = self._process.poll()
        tail = " | ".join(self._stderr_tail) or "no output on stderr"
        return f"pid {self._process.pid}, exit code {code}; last stderr: {tail}"


class SpeechStream(Iterator[SpeechChunk]):
    """One request's chunks in order; closing it abandons the rest."""

    def __init__(
        self, worker: WorkerProcess, request_id: int, replies: SimpleQueue[_Reply], reply_timeout_s: float
    ) -> None:
        self._worker = worker
        self._request_id = request_id
        self._replies = replies
        self._reply_timeout_s = reply_timeout_s
        self._finished = False

    def __next__(self) -> SpeechChunk:
        if self._finished:
            raise StopIteration
        reply = self._next_reply()
        if isinstance(reply, SpeechChunk):
            return reply
        self._finished = True
        if reply is None:
            raise StopIteration
        raise self._worker.kind.error(reply.message)

    def _next_reply(self) -> _Reply:
        while True:
            try:
                return self._replies.get(timeout=POLL_S)
            except queue.Empty:
                if self._worker.stalled_for() > self._reply_timeout_s:
                    self._worker.kill(f"sent nothing for {self._reply_timeout_s:g} s (tts.reply_timeout_s)")

    def close(self) -> None:
        """Barge-in: the worker stops after the piece it is synthesising, and its chunks are dropped."""
        if not self._finished:
            self._finished = True
            self._worker.abort(self._request_id)

    def __del__(self) -> None:
        self.close()


class WorkerPool:
    """Worker processes of one kind, all started with the same configuration."""

    def __init__(self, kind: WorkerKind, config_json: str, settings: WorkerSettings) -> None:
        self.kind = kind
        self._config_json = config_json
        self._settings = settings
        self._request_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self._spare: WorkerProcess | None = None
        self._workers = [WorkerProcess(kind, config_json) for _ in range(settings.workers)]
        try:
            for worker in self._workers:
                worker.wait_until_ready()
        except BaseException:
            self.close()
            raise
        self._start_spare()

    @property
    def ready_info(self) -> dict[str, Any]:
        """What the first worker said it loaded (every worker loads the same)."""
        return self._workers[0].ready_info

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (they change when a dead worker is restarted)."""
        with self._lock:
            return [worker.pid for worker in self._workers]

    def synthesize(self, text: str, voice: str, speed: float) -> SpeechStream:
        return self._submit(text, voice, speed, None)

    def warm_up(self, text: str, voice: str) -> None:
        """Every worker synthesises ``text``, so none serves its first real request cold."""
        for worker in list(self._workers):
            for _ in self._submit(text, voice, 1.0, worker):
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
            if self._spare is not None:
                workers.append(self._spare)
                self._spare = None
        for worker in workers:
            worker.close()

    def _start_spare(self) -> None:
        """Start a worker in the background, to take the place of the next one that dies."""
        if self._settings.spare_workers:
            threading.Thread(target=self._make_spare, name=f"{self.kind.label}-spare", daemon=True).start()

    def _make_spare(self) -> None:
        spare = WorkerProcess(self.kind, self._config_json)
        try:
            spare.wait_until_ready()
        except self.kind.error as error:
            logger.warning("the spare %s worker failed to start: %s", self.kind.label, error)
            return
        with self._lock:
            if not self._closed and self._spare is None:
                self._spare, spare = spare, None
        if spare is not None:  # closed meanwhile
            spare.close()

    def _replacement(self) -> WorkerProcess:
        """The spare, if one is ready (then another is started), else a worker started now. Holds the lock."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.alive:
            self._start_spare()
            return spare
        worker = WorkerProcess(self.kind, self._config_json)
        worker.wait_until_ready()
        return worker

    def _submit(self, text: str, voice: str, speed: float, worker: WorkerProcess | None) -> SpeechStream:
        """Send a request to ``worker``, or to the least busy worker (one that died is restarted first)."""
        with self._lock:
            if self._closed:
                raise self.kind.error(f"the {self.kind.label} engine is closed")
            if worker is None:
                # A dead worker has nothing outstanding, so it is picked, and restarted, first.
                index = min(range(len(self._workers)), key=lambda i: self._workers[i].outstanding)
                if not self._workers[index].alive:
                    logger.warning("replacing %s worker %d, which died", self.kind.label, self._workers[index].pid)
                    self._workers[index] = self._replacement()
                worker = self._workers[index]
            request_id = next(self._request_ids)
            replies = worker.submit(request_id, text, voice, speed)
            return SpeechStream(worker, request_id, replies, self._settings.reply_timeout_s)


class WorkerTTS(TTSEngine):
    """What every TTS engine run in worker processes shares: its voices, served by a WorkerPool."""

    _settings: WorkerSettings
    _workers: WorkerPool
    _voice_names: list[str]  # the voices it offers, in order
    _warm_up_text: str = "Hello there."

    @property
    def voices(self) -> list[str]:
        return list(self._voice_names)

    @property
    def default_voice(self) -> str:
        return self._settings.default_voice  # type: ignore[attr-defined]

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (they change when a dead or hung worker is replaced)."""
        return self._workers.pids

    def synthesize(self, text: str, voice: str, speed: float = 1.0) -> Iterator[SpeechChunk]:
        """Synthesis starts at once, before the first chunk is asked for."""
        if voice not in self._voice_names:
            raise ValueError(self._unknown_voice_message(voice))
        return self._workers.synthesize(text, voice, speed)

    def _unknown_voice_message(self, voice: str) -> str:
        return f"unknown voice {voice!r}; available voices: {', '.join(self._voice_names)}"

    def warm_up(self) -> None:
        self._workers.warm_up(self._warm_up_text, self.default_voice)

    def close(self) -> None:
        self._workers.close()

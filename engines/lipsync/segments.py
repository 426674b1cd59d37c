"""The speech pushed to a lip-sync stream, as segments (one per turn), oldest first: what every engine's
stream shares. Audio goes to the newest segment until it ends; audio after that opens a new one."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

import numpy as np

from engines.base import LipSyncStream, PhonemeTiming, mono_samples


class Segment(Protocol):
    @property
    def ended(self) -> bool: ...

    def push(self, audio: np.ndarray) -> None: ...

    def end(self) -> None: ...


S = TypeVar("S", bound=Segment)


class Segments(Generic[S]):
    def __init__(self, open_segment: Callable[[], S]) -> None:
        self._open_segment = open_segment
        self._queue: deque[S] = deque()

    def push(self, audio: np.ndarray) -> None:
        """Append float32 mono speech to the open segment (opening one if the newest has ended)."""
        samples = mono_samples(audio)
        if not samples.size:
            return
        if not self._queue or self._queue[-1].ended:
            self._queue.append(self._open_segment())
        self._queue[-1].push(samples)

    def end(self) -> None:
        if self._queue and not self._queue[-1].ended:
            self._queue[-1].end()

    def clear(self) -> None:
        self._queue.clear()

    def to_render(self) -> Iterator[S]:
        """The segments to render from, oldest first. An ended one is dropped once the caller has rendered
        what it yielded; the iteration stops after the open one (its rest is not known yet)."""
        while self._queue:
            segment = self._queue[0]
            yield segment
            if not segment.ended:
                return
            self._queue.popleft()


class SegmentedStream(LipSyncStream, Generic[S]):
    """A lip-sync stream keeping its speech in Segments; its methods may be called from different threads."""

    def __init__(self, open_segment: Callable[[], S]) -> None:
        self._segments: Segments[S] = Segments(open_segment)
        self._lock = threading.Lock()

    def push_audio(self, audio: np.ndarray, phonemes: tuple[PhonemeTiming, ...] | None = None) -> None:
        with self._lock:
            self._segments.push(audio)

    def end_segment(self) -> None:
        with self._lock:
            self._segments.end()

"""Writing and speaking one reply: LLM deltas → chunker → TTS → the avatar's output, all at once.

The text is written (by the LLM, or given) while TTS and lip-sync speak what is written so far; a
failure in either stops both. The LLM pauses while the reply's first chunk is synthesised, so TTS has
the cores (``reply.first_chunk_priority``), and TTS runs no further ahead of playback than
``reply.speak_ahead_s``, so a reply interrupted early leaves little of itself to cancel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from engines.audio import resample, silence_before_onset
from engines.base import ChatMessage, LLMEngine, Persona, PhonemeTiming, SpeechChunk, TTSEngine
from media_server.config import DeadlineSettings, ReplySettings
from media_server.conversation.chunker import SpeechChunker
from media_server.conversation.deadlines import items_within, within
from media_server.conversation.events import Event, ReplyDelta
from media_server.conversation.turn import Turn
from media_server.media.timeline import AvatarOutput
from media_server.threads import iterate_in_thread

Send = Callable[[Turn, Event], None]


async def given_text(text: str) -> AsyncIterator[str]:
    yield text


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


class Replier:
    def __init__(
        self,
        llm: LLMEngine,
        tts: TTSEngine,
        voice: str,
        output: AvatarOutput,
        settings: ReplySettings,
        deadlines: DeadlineSettings,
        send: Send,
    ) -> None:
        self.llm = llm
        self.tts = tts
        self.voice = voice
        self.output = output
        self.settings = settings
        self.deadlines = deadlines
        self._send = send

    def llm_deltas(
        self, turn: Turn, persona: Persona, history: list[ChatMessage], context: str = ""
    ) -> AsyncIterator[str]:
        """The LLM's reply to the last message of ``history`` (from ``context``'s passages, if any) as
        deltas, within its deadlines."""
        return timed_llm_deltas(self.llm, persona, history, self.deadlines, running=turn.llm_may_run, context=context)

    async def reply(
        self, turn: Turn, deltas: AsyncIterator[str], written: Callable[[Turn], Awaitable[None]], speed: float = 1.0
    ) -> bool:
        """Speak what ``deltas`` write; ``written(turn)`` once the whole text is known (speech goes on).
        False when the reply had nothing to say (no audio will play)."""
        chunks: asyncio.Queue[str | None] = asyncio.Queue()
        try:
            async with asyncio.TaskGroup() as stages:
                stages.create_task(self._write(turn, deltas, chunks, written))
                speaking = stages.create_task(self._speak(turn, chunks, speed))
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from None
        return speaking.result()

    async def _write(
        self,
        turn: Turn,
        deltas: AsyncIterator[str],
        chunks: asyncio.Queue[str | None],
        written: Callable[[Turn], Awaitable[None]],
    ) -> None:
        chunker = SpeechChunker(self.settings.first_chunk_min_words, self.settings.first_chunk_at_phrase)
        async for delta in deltas:
            turn.mark("first_token")
            turn.reply += delta
            self._send(turn, ReplyDelta(delta, turn.id))
            for chunk in chunker.feed(delta):
                self._queue_chunk(turn, chunk, chunks)
        for chunk in chunker.flush():
            self._queue_chunk(turn, chunk, chunks)
        chunks.put_nowait(None)
        await written(turn)

    def _queue_chunk(self, turn: Turn, chunk: str, chunks: asyncio.Queue[str | None]) -> None:
        if "first_clause" not in turn.marks and self.settings.first_chunk_priority:
            turn.llm_may_run.clear()  # set again by _speak once the chunk is synthesised
        turn.mark("first_clause")
        chunks.put_nowait(chunk)

    async def _speak(self, turn: Turn, chunks: asyncio.Queue[str | None], speed: float) -> bool:
        # Only the reply's first sound is brought forward: later sentences keep their pauses.
        trim_pending = self.settings.trim_leading_silence
        rate = self.output.sample_rate
        while (text := await chunks.get()) is not None:
            if self.settings.speak_ahead_s:
                await self.output.wait_until_ahead_below(turn.id, self.settings.speak_ahead_s)
            async for chunk in timed_speech(self.tts, text, self.voice, speed, self.deadlines):
                turn.mark("first_tts_audio")
                audio, phonemes = resample(chunk.audio, chunk.sample_rate, rate), chunk.phonemes
                if trim_pending:
                    audio, phonemes = from_onset(audio, phonemes, rate)
                    trim_pending = False
                caption = chunk.text if chunk.starts_sentence else ""
                speaking = self.output.speak(turn.id, audio, phonemes, caption)
                await within(speaking, self.deadlines.lipsync_s, "lipsync", "lipsync_s")
            # Only once the whole chunk is synthesised: its first audio is out sooner, but the LLM
            # resuming then would take the cores from the rest of it.
            turn.llm_may_run.set()
        return await within(self.output.end_turn(turn.id), self.deadlines.lipsync_s, "lipsync", "lipsync_s")


def timed_llm_deltas(
    llm: LLMEngine,
    persona: Persona,
    history: list[ChatMessage],
    deadlines: DeadlineSettings,
    running: threading.Event | None = None,
    context: str = "",
) -> AsyncIterator[str]:
    """The LLM's reply to the last message of ``history`` (from ``context``'s passages, if any) as deltas,
    each within its deadline; with ``running``, the model pauses while it is clear. Leaving early stops
    the model."""
    deltas = iterate_in_thread(
        lambda cancelled: llm.stream_reply(persona, history, cancelled.is_set, context), running=running
    )
    first = (deadlines.llm_first_token_s, "llm_first_token_s")
    following = (deadlines.llm_next_token_s, "llm_next_token_s")
    return items_within(deltas, first, following, "llm")


def timed_speech(
    tts: TTSEngine, text: str, voice: str, speed: float, deadlines: DeadlineSettings
) -> AsyncIterator[SpeechChunk]:
    """``text`` spoken as it is synthesised, each piece within ``deadlines.tts_s``."""
    pieces = iterate_in_thread(lambda cancelled: tts.synthesize(text, voice, speed))
    deadline = (deadlines.tts_s, "tts_s")
    return items_within(pieces, deadline, deadline, "tts")


def from_onset(
    audio: np.ndarray, phonemes: tuple[PhonemeTiming, ...] | None, rate: int
) -> tuple[np.ndarray, tuple[PhonemeTiming, ...] | None]:
    """The reply's first audio from its first sound: a voice's lead-in silence would only delay the
    moment the user hears the answer."""
    skipped = silence_before_onset(audio, rate)
    if phonemes is not None:
        shift = skipped / rate
        phonemes = tuple(
            PhonemeTiming(p.phoneme, max(0.0, p.start - shift), max(0.0, p.end - shift))
            for p in phonemes
            if p.end > shift
        )
    return audio[skipped:], phonemes

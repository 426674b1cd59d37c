"""Speech for the model APIs: the voice a request names, a text spoken as the TTS engine synthesises it,
and a reply spoken sentence by sentence while the LLM is still writing it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np

from engines.base import SpeechChunk, TTSEngine
from media_server.config import DeadlineSettings, ReplySettings
from media_server.conversation.chunker import SpeechChunker
from media_server.conversation.deadlines import StageTimeout
from media_server.conversation.replying import timed_speech
from media_server.service.errors import BadInput, EngineFailed, EngineTimedOut, not_found
from media_server.sessions.messages import UNSPEAKABLE

# OPEA's services name the voice "default" when the client names none.
DEFAULT_VOICE_NAMES = ("default", "")
MIN_SPEED, MAX_SPEED = 0.25, 4.0  # OpenAI's range


def chosen_voice(tts: TTSEngine, requested: object, default: str) -> str:
    """The voice a request names (``default`` for none, or OPEA's "default"); NotFound naming the voices."""
    if requested is None or requested in DEFAULT_VOICE_NAMES:
        return default
    if not isinstance(requested, str) or requested not in tts.voices:
        raise not_found("voice", requested, ["default", *tts.voices])
    return requested


def checked_text(text: object, field: str, max_chars: int) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f'"{field}" must be a non-empty string of text to speak')
    if len(text) > max_chars:
        raise BadInput(f'"{field}" has {len(text)} characters; the limit is {max_chars} (api.max_text_chars)')
    if UNSPEAKABLE.search(text):
        raise BadInput(f'"{field}" holds control characters or invalid Unicode (lone surrogates); send plain text')
    if not any(character.isalnum() for character in text):
        raise BadInput(f'"{field}" has nothing to say: no letters or digits')
    return text.strip()


def checked_speed(speed: object) -> float:
    if speed is None:
        return 1.0
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise BadInput(f'"speed" must be a number from {MIN_SPEED} to {MAX_SPEED}')
    return float(speed)


async def speech(
    tts: TTSEngine, text: str, voice: str, deadlines: DeadlineSettings, speed: float = 1.0
) -> AsyncIterator[SpeechChunk]:
    """``text`` spoken, piece by piece as the engine synthesises it; EngineFailed when it cannot be."""
    pieces = timed_speech(tts, text, voice, speed, deadlines)
    try:
        async for piece in pieces:
            yield piece
    except StageTimeout as error:
        raise EngineTimedOut(str(error)) from None
    except Exception as error:  # the engine's own failure, in its words
        raise EngineFailed(f"the tts engine failed: {error}") from None
    finally:
        await pieces.aclose()


async def spoken_reply(
    deltas: AsyncIterator[str], tts: TTSEngine, voice: str, reply: ReplySettings, deadlines: DeadlineSettings
) -> AsyncIterator[SpeechChunk]:
    """What ``deltas`` write, spoken chunk by chunk as soon as each is written (the LLM goes on meanwhile)."""
    chunks: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

    async def write() -> None:
        chunker = SpeechChunker(reply.first_chunk_min_words, reply.first_chunk_at_phrase)
        try:
            async for delta in deltas:
                for chunk in chunker.feed(delta):
                    chunks.put_nowait(chunk)
            for chunk in chunker.flush():
                chunks.put_nowait(chunk)
            chunks.put_nowait(None)
        except Exception as error:  # handed to the consumer, which raises it
            chunks.put_nowait(error)

    writer = asyncio.create_task(write())
    try:
        while (chunk := await chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            async for piece in speech(tts, chunk, voice, deadlines):
                yield piece
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


NO_AUDIO = "the voice gave no audio for the text: is it in a language the voice speaks?"


def joined(pieces: list[SpeechChunk]) -> tuple[np.ndarray, int]:
    """The pieces' audio as one clip, at their rate."""
    if not pieces:
        raise BadInput(NO_AUDIO)
    return np.concatenate([piece.audio for piece in pieces]).astype(np.float32), pieces[0].sample_rate

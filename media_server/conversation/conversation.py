"""One session's conversation: what it heard (listening.py), the turn in progress (turn.py) and how it
replies (replying.py), wired to the avatar's output.

A turn is one asyncio task. A barge-in cancels it, and with it every stage's task and queue, then
clears what the avatar's output still holds. Everything the client sees goes through ``_emit``, which
is also the one place the conversation's state is set.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
from aiortc.mediastreams import MediaStreamTrack

from engines.base import ChatMessage, EngineSet
from media_server.config import Settings
from media_server.conversation.deadlines import within
from media_server.conversation.events import (
    Error,
    Event,
    Interrupted,
    PlaybackGap,
    ReplyFinal,
    Resumed,
    Source,
    Sources,
    Spoken,
    State,
    StateChanged,
    Transcript,
    TurnLatency,
)
from media_server.conversation.knowledge import Retriever, prompt_context
from media_server.conversation.listening import Listener, partial_transcripts
from media_server.conversation.persona import PersonaProfile, slower
from media_server.conversation.replying import Replier, given_text
from media_server.conversation.turn import Turn
from media_server.conversation.turn_policy import TurnEvent, TurnEventKind
from media_server.media.microphone import microphone_windows
from media_server.media.timeline import AvatarOutput, Playback, PlaybackEvent
from media_server.metrics import ServerMetrics

log = logging.getLogger(__name__)
Emit = Callable[[Event], None]


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("preparing the next reply failed: %s", future.exception())


class Conversation:
    def __init__(
        self,
        *,
        engines: EngineSet,
        settings: Settings,
        persona: PersonaProfile,
        voice: str,
        output: AvatarOutput,
        metrics: ServerMetrics,
        emit: Emit,
        history: Sequence[ChatMessage] = (),
        on_history: Callable[[list[ChatMessage]], None] = lambda history: None,
        knowledge: Retriever | None = None,
    ) -> None:
        """``history``: what an earlier session of this conversation said; ``on_history`` is given the
        history after each change (a cluster keeps it for the next session)."""
        self.engines = engines
        self.settings = settings
        self.profile = persona
        self.persona = persona.persona
        self.knowledge = knowledge
        self.speed = 1.0  # the speech rate: lowered by "say that slower" for the rest of the conversation
        self.output = output
        self.metrics = metrics
        self._client_emit = emit
        self.state: State = "listening"
        self.history: list[ChatMessage] = list(history)
        self._on_history = on_history
        self.last_client_activity = time.monotonic()
        self.listener = Listener(
            engines.vad, settings, metrics, on_turn_event=self._on_turn_event, avatar_busy=self._avatar_busy
        )
        self.replier = Replier(engines.llm, engines.tts, voice, output, settings.reply, settings.deadlines, self._send)
        self._turn_ids = itertools.count(1)
        self._turn: Turn | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._partial_task: asyncio.Task[None] | None = None
        self._llm_preparation: asyncio.Future[None] | None = None
        self._avatar_paused_at: float | None = None
        output.add_playback_listener(self._on_playback)
        output.add_sent_audio_listener(self.listener.avatar_played)

    def _emit(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            self.state = event.state
        self._client_emit(event)

    # --- listening -----------------------------------------------------------------------------

    async def consume_microphone(self, track: MediaStreamTrack) -> None:
        """Where the user's voice enters the conversation: every window of it, until the track ends."""
        vad = self.engines.vad
        async for window, captured_until in microphone_windows(
            track, vad.sample_rate, vad.window_samples, self._client_active
        ):
            self.listener.on_window(window, captured_until)

    def _client_active(self, at: float) -> None:
        self.last_client_activity = at

    def _avatar_busy(self) -> bool:
        turn = self._turn
        replying = self._turn_task is not None and turn is not None and turn.confirmed
        return replying or self.output.speaking

    def _on_turn_event(self, event: TurnEvent) -> None:
        kind, listener = event.kind, self.listener
        if kind is TurnEventKind.AVATAR_PAUSE:
            self.output.pause()
            self._avatar_paused_at = time.monotonic()
        elif kind is TurnEventKind.AVATAR_RESUME:
            self.output.resume()
            self._avatar_paused_at = None
            self._emit(Resumed())
        elif kind is TurnEventKind.INTERRUPT:
            self.interrupt(reason="barge-in", user_started=listener.wall_time_of(event.at))
        elif kind is TurnEventKind.USER_STARTED:
            listener.start_utterance()
            self._partial_task = asyncio.create_task(
                partial_transcripts(
                    listener,
                    self.engines.asr,
                    self.profile.asr_language,
                    self.settings.turn_taking.partial_interval_ms / 1000,
                    self._speculating,
                    self._on_partial,
                )
            )
        elif kind is TurnEventKind.USER_PAUSED:
            self._start_turn(listener.wall_time_of(event.at), audio=listener.speculative_audio(), confirmed=False)
        elif kind is TurnEventKind.USER_RESUMED:
            self._drop_speculative_turn()
        elif kind is TurnEventKind.USER_ENDED:
            self._cancel_partials()
            audio = listener.take_utterance()
            turn = self._turn
            if self._speculating() and turn is not None:
                self._confirm(turn)
            else:
                self._start_turn(listener.wall_time_of(event.at), audio=audio)

    def _speculating(self) -> bool:
        return self._turn is not None and not self._turn.confirmed and self._turn_task is not None

    async def _on_partial(self, text: str) -> None:
        self._emit(Transcript(text, final=False))
        if self.settings.turn_taking.prefill_question and not self.listener.pausing():
            # The LLM reads the question so far while the user says the rest of it.
            try:
                await asyncio.to_thread(self.engines.llm.prepare, self.persona, list(self.history), text)
            except Exception as error:  # only a head start: the reply reads the question anyway
                log.warning("reading the question ahead failed: %s", error)

    def _cancel_partials(self) -> None:
        if self._partial_task is not None:
            self._partial_task.cancel()
            self._partial_task = None

    def _drop_speculative_turn(self) -> None:
        """The user went on talking: the reply prepared during their pause was never shown; discard it."""
        turn = self._turn
        if self._speculating() and turn is not None and self._turn_task is not None:
            self._turn_task.cancel()
            self._turn_task = None
            self._turn = None
            self.output.discard(turn.id)
            self.metrics.turns.labels("speculative_dropped").inc()

    def _confirm(self, turn: Turn) -> None:
        turn.confirm(self._emit)
        self.output.reveal(turn.id)

    # --- turns -----------------------------------------------------------------------------------

    def begin(self) -> None:
        """The session started: the LLM reads the persona's preamble (loading what it needs for the
        persona's language) before the first question comes."""
        self._prepare_next_reply()

    def greet(self) -> None:
        """Say the persona's greeting, if it has one (a client has just started listening)."""
        if self.profile.greeting:
            self.say(self.profile.greeting)

    def say(self, text: str) -> Turn:
        """Speak ``text`` as it is, without the LLM (broadcasts, announcements)."""
        self.last_client_activity = time.monotonic()
        self.interrupt(reason="new message")
        return self._start_turn(time.monotonic(), text=text, verbatim=True)

    def submit_text(self, text: str) -> Turn:
        self.last_client_activity = time.monotonic()
        self.interrupt(reason="new message")
        self._emit(Transcript(text, final=True, typed=True))
        return self._start_turn(time.monotonic(), text=text)

    def _start_turn(
        self,
        started: float,
        *,
        audio: np.ndarray | None = None,
        text: str | None = None,
        confirmed: bool = True,
        verbatim: bool = False,
    ) -> Turn:
        if self._turn_task is not None:
            self._turn_task.cancel()
        turn = Turn(next(self._turn_ids), started, confirmed=confirmed, speed=self.speed)
        if not confirmed:
            self.output.hold(turn.id)
        self._turn = turn
        self._turn_task = asyncio.create_task(self._run_turn(turn, audio, text, verbatim))
        self._turn_task.add_done_callback(self._turn_task_done)
        return turn

    def _turn_task_done(self, task: asyncio.Task[None]) -> None:
        if self._turn_task is task:
            self._turn_task = None

    async def _run_turn(self, turn: Turn, audio: np.ndarray | None, text: str | None, verbatim: bool) -> None:
        try:
            self._send(turn, StateChanged("thinking"))
            if audio is not None:
                text = await self._transcribe(turn, audio)
                if not text and self.profile.not_heard:
                    text, verbatim, turn.remembered = self.profile.not_heard, True, False
            if not text:
                self._send(turn, StateChanged("listening"))
                turn.settle(ReplyFinal("", turn.id))
                return
            deltas = given_text(text) if verbatim else await self._answer(turn, text)
            if not await self.replier.reply(turn, deltas, self._written, turn.speed):
                self._send(turn, StateChanged("listening"))
        except asyncio.CancelledError:
            turn.settle(ReplyFinal(turn.reply.strip(), turn.id, interrupted=True))
            raise
        except Exception as error:  # one session's engine failure is reported to it and to nobody else
            log.warning("turn %s failed: %s", turn.id, error, exc_info=not isinstance(error, TimeoutError))
            failure = Error("turn_failed", f"the reply failed: {error}")
            self.report_error(failure)
            turn.settle(failure)
            self.output.clear()
            self._emit(StateChanged("listening"))

    async def _transcribe(self, turn: Turn, audio: np.ndarray) -> str:
        language = self.profile.asr_language
        transcribing = asyncio.to_thread(self.engines.asr.transcribe, audio, language=language)
        transcript = await within(transcribing, self.settings.deadlines.asr_s, "asr", "asr_s")
        turn.mark("transcript")
        detected = transcript.language if self.profile.detect_language else None
        self._send(turn, Transcript(transcript.text, final=True, turn=turn.id, language=detected))
        return transcript.text

    async def _answer(self, turn: Turn, text: str) -> AsyncIterator[str]:
        """What the avatar answers ``text`` with: the LLM's reply, or, asked to say that slower, its last
        reply again, more slowly (and every reply after it)."""
        if self.profile.asks_slower(text):
            turn.speed = slower(turn.speed)
            if last := self._last_reply():
                turn.remembered = False  # a repetition: the conversation the LLM sees is unchanged
                return given_text(last)
        turn.question = ChatMessage("user", text)
        context = await self._context(turn, text)
        return self.replier.llm_deltas(turn, self.persona, [*self.history, turn.question], context)

    async def _context(self, turn: Turn, question: str) -> str:
        """The passages of the persona's knowledge bases that answer ``question``, as the LLM's context
        ("" when there are none); the sources event names those given to the LLM."""
        if self.knowledge is None or not (bases := self.knowledge.existing(self.profile.knowledge_bases)):
            return ""
        searching = asyncio.to_thread(self.knowledge.search, bases, question)
        passages = await within(searching, self.settings.deadlines.knowledge_s, "knowledge", "knowledge_s")
        used, context = prompt_context(passages, self.settings.knowledge)
        if used:
            sources = tuple(Source(p.document, p.location, p.snippet) for p in used)
            self._send(turn, Sources(turn.id, sources))
        return context

    def _last_reply(self) -> str:
        return next((message.text for message in reversed(self.history) if message.role == "assistant"), "")

    def _send(self, turn: Turn, event: Event) -> None:
        turn.send(event, self._emit)

    async def _written(self, turn: Turn) -> None:
        """The reply's text is complete (its speech goes on): the exchange joins the history."""
        await turn.until_confirmed()
        self.speed = turn.speed
        self._remember_exchange(turn)
        final = ReplyFinal(turn.reply.strip(), turn.id)
        self._send(turn, final)
        turn.settle(final)

    # --- playback and interruption -----------------------------------------------------------

    def _on_playback(self, event: PlaybackEvent) -> None:
        turn = self._turn
        if turn is None or turn.id != event.turn:
            return
        if event.kind is Playback.RENDERED:
            turn.mark("first_lipsync_frame")
        elif event.kind is Playback.SPOKEN:
            self._emit(Spoken(turn.id, event.caption))
        elif event.kind is Playback.STARTED:
            turn.marks.setdefault("first_audio_sent", event.at)
            self._emit(StateChanged("speaking"))
            latencies = turn.latencies_ms()
            for stage, ms in latencies.items():
                self.metrics.stage_latency.labels(stage).observe(ms / 1000)
            self._emit(TurnLatency(turn.id, latencies))
        else:
            self._prepare_next_reply()
            self.metrics.turns.labels("completed").inc()
            self.metrics.playback_gap.observe(event.longest_gap_s)
            self._emit(PlaybackGap(turn.id, round(event.longest_gap_s * 1000, 1)))
            self._emit(StateChanged("listening"))

    def interrupt(self, reason: str, user_started: float | None = None) -> None:
        """Stop the avatar now: cancel the turn's tasks and drop every queued frame and sample."""
        task, self._turn_task = self._turn_task, None
        was_speaking = self.output.speaking
        if task is None and not was_speaking:
            return
        if task is not None:
            task.cancel()
        # Audio stopped when the output paused on the first voiced windows, if it did.
        stopped_at = self._avatar_paused_at or time.monotonic()
        self._avatar_paused_at = None
        self.output.clear()
        turn = self._turn
        if turn is not None and turn.confirmed:
            self.metrics.turns.labels("interrupted").inc()
            self.speed = turn.speed
            self._remember_exchange(turn)
            self._prepare_next_reply()
            final = ReplyFinal(turn.reply.strip(), turn.id, interrupted=True)
            self._emit(final)
            turn.settle(final)
        stopped_after_ms = None
        if was_speaking and user_started is not None:
            stopped_after = max(0.0, stopped_at - user_started)
            self.metrics.barge_in.observe(stopped_after)
            stopped_after_ms = round(stopped_after * 1000, 1)
        self._emit(Interrupted(reason, stopped_after_ms))
        self._emit(StateChanged("listening"))

    def _remember_exchange(self, turn: Turn) -> None:
        """Put the turn's question, and as much of the reply as was written, into the history (once)."""
        if not turn.remembered:
            return
        if turn.question is not None:
            self._remember(turn.question)
            turn.question = None
        if turn.reply.strip() and not turn.reply_in_history:
            turn.reply_in_history = True
            self._remember(ChatMessage("assistant", turn.reply.strip()))

    def _prepare_next_reply(self) -> None:
        """Have the LLM evaluate the conversation so far while the user listens or starts to speak, so
        the next reply evaluates only its question, even on the turn that drops old exchanges."""
        preparation = asyncio.ensure_future(
            asyncio.to_thread(self.engines.llm.prepare, self.persona, list(self.history))
        )
        preparation.add_done_callback(_log_failure)
        self._llm_preparation = preparation  # referenced until done

    def _remember(self, message: ChatMessage) -> None:
        self.history.append(message)
        del self.history[: -self.settings.memory.max_history_messages]
        self._on_history(list(self.history))

    def report_error(self, error: Error) -> None:
        self.metrics.errors.labels(error.code).inc()
        self._emit(error)

    async def close(self) -> None:
        """Cancel the turn in progress and wait until it has stopped (before the output it uses is closed)."""
        tasks = [task for task in (self._partial_task, self._turn_task) if task is not None]
        self._partial_task = self._turn_task = None
        if self._turn is not None:
            self._turn.settle(Error("session_closed", "the session was closed"))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.output.clear()

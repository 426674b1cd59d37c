"""One session's conversation: microphone → VAD → turn policy → ASR → LLM → chunker → TTS →
lip-sync → the output timeline. A turn is one asyncio task; a barge-in cancels it, and with it
every stage's task and queue, then clears what the timeline and the lip-sync stream still hold.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engines.avatar import Avatar
from engines.base import ChatMessage, EngineSet, LipSyncStream, Persona, PhonemeTiming
from engines.audio import resample, silence_before_onset
from media_server.audio import CaptureClock, MicrophoneResampler
from media_server.av_output import AVTimeline, PlaybackEvent, QueuedFrame
from media_server.chunker import SpeechChunker
from media_server.config import Settings, TurnSettings
from media_server.echo_guard import EchoGuard
from media_server.metrics import STAGES, ServerMetrics
from media_server.threads import iterate_in_thread
from media_server.turn_policy import TurnEvent, TurnEventKind, TurnPolicy

log = logging.getLogger(__name__)
Emit = Callable[[dict[str, object]], None]
MIN_PARTIAL_SECONDS = 0.6
LIPSYNC_PIECE_S = 0.2
# Two frames at 25 fps (one to show, one the renderer looks ahead into), then two more while it plays.
TURN_START_LIPSYNC_PIECES_S = (0.08, 0.08)


@dataclass
class Turn:
    """Timestamps (time.monotonic) of one turn's stages, from the end of the user's input."""

    id: int
    started: float  # end of the user's speech, or the typed message's arrival
    marks: dict[str, float] = field(default_factory=dict)
    reply: str = ""
    reply_in_history: bool = False
    question: ChatMessage | None = None  # until it is in the history
    # A speculative turn (prepared during a short pause) shows nothing until the pause is confirmed.
    confirmed: bool = True
    held_events: list[dict[str, object]] = field(default_factory=list)
    held_frames: list[QueuedFrame] = field(default_factory=list)
    # Cleared while the first chunk is synthesised: the LLM pauses, and TTS has the cores.
    llm_may_run: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.llm_may_run.set()

    def mark(self, stage: str) -> None:
        self.marks.setdefault(stage, time.monotonic())

    def latencies_ms(self) -> dict[str, float]:
        return {stage: round((self.marks[stage] - self.started) * 1000, 1) for stage in STAGES if stage in self.marks}


async def _single(text: str) -> AsyncIterator[str]:
    yield text


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("preparing the next reply failed: %s", future.exception())


def lipsync_pieces(samples: int, rate: int, turn_starts: bool) -> list[tuple[int, int]]:
    """(start, end) of the pieces a chunk's audio is rendered in, so the first frames are queued before
    the whole sentence is rendered. A turn starts with short pieces, so its first frame is queued at once
    and each next piece is rendered before the frames already queued have played."""
    sizes = [int(seconds * rate) for seconds in (TURN_START_LIPSYNC_PIECES_S if turn_starts else ())]
    bounds = [0]
    while bounds[-1] < samples:
        size = sizes.pop(0) if sizes else int(LIPSYNC_PIECE_S * rate)
        bounds.append(min(bounds[-1] + size, samples))
    return list(itertools.pairwise(bounds))


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


class Conversation:
    def __init__(
        self,
        *,
        engines: EngineSet,
        turn_settings: TurnSettings,
        persona: Persona,
        voice: str,
        lipsync: LipSyncStream,
        lipsync_executor: Executor,
        timeline: AVTimeline,
        metrics: ServerMetrics,
        emit: Emit,
    ) -> None:
        self.engines = engines
        self.settings = turn_settings
        self.persona = persona
        self.voice = voice
        self.lipsync = lipsync
        self.lipsync_executor = lipsync_executor
        self.timeline = timeline
        self.metrics = metrics
        self.emit = emit
        self.history: list[ChatMessage] = []
        self.last_client_activity = time.monotonic()
        self._vad = engines.vad.open_stream()
        window = engines.vad.window_samples
        self._window_s = window / engines.vad.sample_rate
        self._policy = TurnPolicy(turn_settings, self._window_s)
        self._pre_roll: deque[np.ndarray] = deque(maxlen=max(1, int(turn_settings.pre_roll_ms / 1000 / self._window_s)))
        self._utterance: list[np.ndarray] = []
        self._audio_time = 0.0
        self._turn_ids = 0
        self._turn: Turn | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._partial_task: asyncio.Task[None] | None = None
        self._llm_preparation: asyncio.Future[None] | None = None
        self._avatar_paused_at: float | None = None
        self.speculative_dropped = 0
        timeline.on_playback = self._on_playback
        self._echo = EchoGuard(engines.vad.sample_rate, threshold=turn_settings.echo_correlation)
        if turn_settings.echo_guard:
            timeline.audio.on_taken = lambda packet: self._echo.played(packet.opaque / 32768.0, time.monotonic())
        self.echo_windows = 0

    # --- microphone ----------------------------------------------------------

    async def consume_microphone(self, track: MediaStreamTrack) -> None:
        rate = self.engines.vad.sample_rate
        converter = MicrophoneResampler(rate)
        capture_clock = CaptureClock()
        window = self.engines.vad.window_samples
        pending = np.zeros(0, np.float32)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.last_client_activity = time.monotonic()
            captured_until = (
                capture_clock.captured_at(frame, self.last_client_activity) + frame.samples / frame.sample_rate
            )
            pending = np.concatenate([pending, converter.convert(frame)])
            while len(pending) >= window:
                self._on_window(pending[:window], captured_until - (len(pending) - window) / rate)
                pending = pending[window:]

    def _on_window(self, window: np.ndarray, captured_until: float) -> None:
        probability = self._vad.speech_probability(window)
        if self.settings.echo_guard:
            self._echo.heard(window, captured_until)
            if probability >= self.settings.vad_threshold and self._echo.is_echo():
                probability = 0.0  # the avatar hearing itself through the client's speakers
                self.echo_windows += 1
        window_start = self._audio_time
        self._audio_time += self._window_s
        if self._policy.user_speaking:
            self._utterance.append(window)
        else:
            self._pre_roll.append(window)
        turn = self._turn
        replying = self._turn_task is not None and turn is not None and turn.confirmed
        avatar_busy = replying or self.timeline.speaking
        for event in self._policy.on_window(probability, window_start, avatar_busy):
            self._on_turn_event(event)

    def _wall_time_of(self, audio_time: float) -> float:
        """Mic audio arrives in real time, so an instant of it maps back to a wall-clock instant."""
        return time.monotonic() - (self._audio_time - audio_time)

    def _on_turn_event(self, event: TurnEvent) -> None:
        kind = event.kind
        if kind is TurnEventKind.AVATAR_PAUSE:
            self.timeline.pause()
            self._avatar_paused_at = time.monotonic()
        elif kind is TurnEventKind.AVATAR_RESUME:
            self.timeline.resume()
            self._avatar_paused_at = None
            self.emit({"type": "resumed"})
        elif kind is TurnEventKind.INTERRUPT:
            self.interrupt(reason="barge-in", user_started=self._wall_time_of(event.at))
        elif kind is TurnEventKind.USER_STARTED:
            self._utterance = list(self._pre_roll)
            self._pre_roll.clear()
            self._partial_task = asyncio.create_task(self._partial_transcripts())
        elif kind is TurnEventKind.USER_PAUSED:
            self._start_turn(self._wall_time_of(event.at), audio=self._speculative_audio(), confirmed=False)
        elif kind is TurnEventKind.USER_RESUMED:
            self._drop_speculative_turn()
        elif kind is TurnEventKind.USER_ENDED:
            self._cancel_partials()
            turn = self._turn
            if self._turn_task is not None and turn is not None and not turn.confirmed:
                self._confirm(turn)
            else:
                audio = np.concatenate(self._utterance) if self._utterance else np.zeros(0, np.float32)
                self._start_turn(self._wall_time_of(event.at), audio=audio)
            self._utterance = []

    def _speculative_audio(self) -> np.ndarray:
        """The utterance so far, with the silence that would end it appended, so the speculative decode
        sees the same audio as the one at the confirmed end of the turn."""
        policy = self._policy
        missing = policy.windows_for(self.settings.min_silence_ms) - policy.windows_for(
            self.settings.speculative_silence_ms
        )
        return np.concatenate([*self._utterance, np.zeros(missing * self.engines.vad.window_samples, np.float32)])

    def _drop_speculative_turn(self) -> None:
        """The user went on talking: the reply prepared during their pause was never shown; discard it."""
        turn = self._turn
        if turn is not None and not turn.confirmed and self._turn_task is not None:
            self._turn_task.cancel()
            self._turn_task = None
            self._turn = None
            self.lipsync_executor.submit(self.lipsync.clear)
            self.speculative_dropped += 1

    def _confirm(self, turn: Turn) -> None:
        turn.confirmed = True
        for event in turn.held_events:
            self.emit(event)
        if turn.held_frames:
            self.timeline.enqueue(turn.held_frames)
        turn.held_events, turn.held_frames = [], []

    def _emit_for(self, turn: Turn, event: dict[str, object]) -> None:
        if turn.confirmed:
            self.emit(event)
        else:
            turn.held_events.append(event)

    async def _partial_transcripts(self) -> None:
        interval = self.settings.partial_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            speculating = self._turn is not None and not self._turn.confirmed and self._turn_task is not None
            # Not in a pause either: it may be the end of the turn, and the final decode would queue behind this one.
            if speculating or self._pausing() or len(self._utterance) * self._window_s < MIN_PARTIAL_SECONDS:
                continue
            audio = np.concatenate(self._utterance)
            transcript = await asyncio.to_thread(self.engines.asr.transcribe, audio, partial=True)
            if not transcript.text:
                continue
            self.emit({"type": "transcript", "text": transcript.text, "final": False})
            if self.settings.prefill_question and not self._pausing():
                # The LLM reads the question so far while the user says the rest of it.
                try:
                    await asyncio.to_thread(self.engines.llm.prepare, self.persona, list(self.history), transcript.text)
                except Exception as error:  # only a head start: the reply reads the question anyway
                    log.warning("reading the question ahead failed: %s", error)

    def _pausing(self) -> bool:
        return self._audio_time - self._policy.last_voiced_end > self._window_s

    def _cancel_partials(self) -> None:
        if self._partial_task is not None:
            self._partial_task.cancel()
            self._partial_task = None

    # --- turns ---------------------------------------------------------------

    def say(self, text: str) -> None:
        """Speak ``text`` as it is, without the LLM (broadcasts, announcements)."""
        self.last_client_activity = time.monotonic()
        self.interrupt(reason="new message")
        self._start_turn(time.monotonic(), text=text, verbatim=True)

    def submit_text(self, text: str) -> None:
        self.last_client_activity = time.monotonic()
        self.interrupt(reason="new message")
        self.emit({"type": "transcript", "text": text, "final": True, "typed": True})
        self._start_turn(time.monotonic(), text=text)

    def _start_turn(
        self,
        started: float,
        *,
        audio: np.ndarray | None = None,
        text: str | None = None,
        confirmed: bool = True,
        verbatim: bool = False,
    ) -> None:
        if self._turn_task is not None:
            self._turn_task.cancel()
        self._turn_ids += 1
        turn = Turn(self._turn_ids, started, confirmed=confirmed)
        self._turn = turn
        self._turn_task = asyncio.create_task(self._run_turn(turn, audio, text, verbatim))
        self._turn_task.add_done_callback(self._turn_task_done)

    def _turn_task_done(self, task: asyncio.Task[None]) -> None:
        if self._turn_task is task:
            self._turn_task = None

    async def _run_turn(self, turn: Turn, audio: np.ndarray | None, text: str | None, verbatim: bool = False) -> None:
        try:
            self._emit_for(turn, {"type": "state", "state": "thinking"})
            if audio is not None:
                transcript = await asyncio.to_thread(self.engines.asr.transcribe, audio)
                turn.mark("transcript")
                text = transcript.text
                self._emit_for(turn, {"type": "transcript", "text": text, "final": True, "turn": turn.id})
            if not text:
                self._emit_for(turn, {"type": "state", "state": "listening"})
                return
            if verbatim:
                await self._reply(turn, _single(text))
            else:
                turn.question = ChatMessage("user", text)
                history = [*self.history, turn.question]
                await self._reply(turn, self._llm_deltas(turn, history))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # one session's engine failure is reported to it and to nobody else
            log.exception("turn %s failed", turn.id)
            self.report_error("turn_failed", f"the reply failed: {error}")
            self.timeline.clear()
            self.emit({"type": "state", "state": "listening"})

    def _llm_deltas(self, turn: Turn, history: list[ChatMessage]) -> AsyncIterator[str]:
        return iterate_in_thread(
            lambda cancelled: self.engines.llm.stream_reply(self.persona, history, cancelled.is_set),
            running=turn.llm_may_run,
        )

    async def _reply(self, turn: Turn, deltas: AsyncIterator[str]) -> None:
        """The text is written (by the LLM, or given) while TTS and lip-sync speak; a failure in either stops both."""
        chunks: asyncio.Queue[str | None] = asyncio.Queue()
        try:
            async with asyncio.TaskGroup() as stages:
                stages.create_task(self._write_reply(turn, deltas, chunks))
                stages.create_task(self._speak_chunks(turn, chunks))
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from None

    async def _write_reply(self, turn: Turn, deltas: AsyncIterator[str], chunks: asyncio.Queue[str | None]) -> None:
        chunker = SpeechChunker(self.settings.first_chunk_min_words, self.settings.first_chunk_at_phrase)
        async for delta in deltas:
            turn.mark("first_token")
            turn.reply += delta
            self._emit_for(turn, {"type": "reply", "delta": delta, "final": False, "turn": turn.id})
            for chunk in chunker.feed(delta):
                self._write_chunk(turn, chunk, chunks)
        for chunk in chunker.flush():
            self._write_chunk(turn, chunk, chunks)
        chunks.put_nowait(None)
        reply = turn.reply.strip()
        await self._wait_confirmed(turn)
        self._remember_exchange(turn)
        self._emit_for(turn, {"type": "reply", "text": reply, "final": True, "turn": turn.id})

    def _write_chunk(self, turn: Turn, chunk: str, chunks: asyncio.Queue[str | None]) -> None:
        if "first_clause" not in turn.marks and self.settings.first_chunk_priority:
            turn.llm_may_run.clear()  # set again by _speak_chunks once the chunk is synthesised
        turn.mark("first_clause")
        chunks.put_nowait(chunk)

    async def _speak_chunks(self, turn: Turn, chunks: asyncio.Queue[str | None]) -> None:
        first = True
        # Only the reply's first sound is brought forward: later sentences keep their pauses.
        trim_pending = self.settings.trim_leading_silence
        while (text := await chunks.get()) is not None:
            await self._until_ahead_below(turn, self.settings.speak_ahead_s)
            speech = iterate_in_thread(lambda cancelled, text=text: self.engines.tts.synthesize(text, self.voice))
            async for chunk in speech:
                turn.mark("first_tts_audio")
                audio = resample(chunk.audio, chunk.sample_rate, self.timeline.sample_rate)
                phonemes = chunk.phonemes
                if trim_pending:
                    audio, phonemes = self._from_onset(audio, phonemes)
                    trim_pending = False
                for offset, end in lipsync_pieces(len(audio), self.timeline.sample_rate, first):
                    piece_phonemes = phonemes if offset == 0 else None
                    frames = await self._lipsync(self._push_speech, audio[offset:end], piece_phonemes)
                    first = self._enqueue(turn, frames, first)
            # Only once the whole chunk is synthesised: its first audio is out sooner, but the LLM
            # resuming then would take the cores from the rest of it.
            turn.llm_may_run.set()
        frames = await self._lipsync(self._finish_segment)
        if frames or not first:
            self._enqueue(turn, frames, first, last=True)
        else:
            self._emit_for(turn, {"type": "state", "state": "listening"})

    async def _until_ahead_below(self, turn: Turn, seconds: float) -> None:
        """Synthesise no further ahead of playback than needed: a reply interrupted early then leaves less
        of itself to cancel, and its TTS and lip-sync do not take the cores from whoever interrupts it."""
        if not seconds:
            return
        limit = seconds * self.timeline.fps
        while self.timeline.queued_frames + len(turn.held_frames) > limit:
            await asyncio.sleep(1 / self.timeline.fps)

    def _from_onset(
        self, audio: np.ndarray, phonemes: tuple[PhonemeTiming, ...] | None
    ) -> tuple[np.ndarray, tuple[PhonemeTiming, ...] | None]:
        """The reply's first audio from its first sound: a voice's lead-in silence (~40 ms for Piper's
        joe) would only delay the moment the user hears the answer."""
        rate = self.timeline.sample_rate
        skipped = silence_before_onset(audio, rate)
        if phonemes is not None:
            shift = skipped / rate
            phonemes = tuple(
                PhonemeTiming(p.phoneme, max(0.0, p.start - shift), max(0.0, p.end - shift))
                for p in phonemes
                if p.end > shift
            )
        return audio[skipped:], phonemes

    def _push_speech(self, audio: np.ndarray, phonemes: tuple[PhonemeTiming, ...] | None) -> list:
        self.lipsync.push_audio(audio, phonemes)
        return self.lipsync.pull()

    def _finish_segment(self) -> list:
        self.lipsync.end_segment()
        return self.lipsync.pull()

    async def _lipsync(self, fn: Callable[..., list], *args: object) -> list:
        return await asyncio.get_running_loop().run_in_executor(self.lipsync_executor, fn, *args)

    def _enqueue(self, turn: Turn, frames: list, first: bool, last: bool = False) -> bool:
        """Queue rendered frames for playback; returns whether the turn's first frame is still to come."""
        if not frames and not last:
            return first
        queued = [QueuedFrame(frame, turn.id) for frame in frames]
        if last and not queued:
            # The final pull gave nothing new: the last frame already queued ends the turn.
            if turn.held_frames:
                turn.held_frames[-1].last_of_turn = True
            else:
                self.timeline.mark_last(turn.id)
            return False
        if first:
            turn.mark("first_lipsync_frame")
            queued[0].first_of_turn = True
        if last:
            queued[-1].last_of_turn = True
        if turn.confirmed:
            self.timeline.enqueue(queued)
        else:
            turn.held_frames.extend(queued)
        return False

    # --- playback and interruption ------------------------------------------

    def _on_playback(self, event: PlaybackEvent) -> None:
        turn = self._turn
        if turn is None or turn.id != event.turn:
            return
        if event.kind == "started":
            turn.marks.setdefault("first_audio_sent", event.at)
            self.emit({"type": "state", "state": "speaking"})
            latencies = turn.latencies_ms()
            for stage, ms in latencies.items():
                self.metrics.stage_latency.labels(stage).observe(ms / 1000)
            self.emit({"type": "metrics", "turn": turn.id, "latency_ms": latencies})
        else:
            self._prepare_next_reply()
            self.metrics.turns.labels("completed").inc()
            self.metrics.playback_gap.observe(event.longest_gap_s)
            self.emit({"type": "metrics", "turn": turn.id, "longest_gap_ms": round(event.longest_gap_s * 1000, 1)})
            self.emit({"type": "state", "state": "listening"})

    def interrupt(self, reason: str, user_started: float | None = None) -> None:
        """Stop the avatar now: cancel the turn's tasks and drop every queued frame and sample."""
        task, self._turn_task = self._turn_task, None
        was_speaking = self.timeline.speaking
        if task is None and not was_speaking:
            return
        if task is not None:
            task.cancel()
        # Audio stopped when the timeline paused on the first voiced windows, if it did.
        stopped_at = self._avatar_paused_at or time.monotonic()
        self._avatar_paused_at = None
        self.timeline.clear()
        self.lipsync_executor.submit(self.lipsync.clear)
        turn = self._turn
        if turn is not None and turn.confirmed:
            self.metrics.turns.labels("interrupted").inc()
            self._remember_exchange(turn)
            self._prepare_next_reply()
            self.emit(
                {"type": "reply", "text": turn.reply.strip(), "final": True, "interrupted": True, "turn": turn.id}
            )
        event: dict[str, object] = {"type": "interrupted", "reason": reason}
        if was_speaking and user_started is not None:
            stopped_after = max(0.0, stopped_at - user_started)
            self.metrics.barge_in.observe(stopped_after)
            event["stopped_after_ms"] = round(stopped_after * 1000, 1)
        self.emit(event)
        self.emit({"type": "state", "state": "listening"})

    async def _wait_confirmed(self, turn: Turn) -> None:
        while not turn.confirmed:
            await asyncio.sleep(0.02)

    def _remember_exchange(self, turn: Turn) -> None:
        """Put the turn's question, and as much of the reply as was written, into the history (once)."""
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
        del self.history[: -self.settings.max_history_messages]

    def pending_work(self) -> dict[str, int]:
        """What the current turn still holds: used by tests to prove a barge-in cleared everything."""
        return {
            "turn_task": int(self._turn_task is not None and not self._turn_task.done()),
            "queued_frames": self.timeline.queued_frames,
        }

    def report_error(self, code: str, message: str) -> None:
        self.metrics.errors.labels(code).inc()
        self.emit({"type": "error", "code": code, "message": message})

    def close(self) -> None:
        self._cancel_partials()
        if self._turn_task is not None:
            self._turn_task.cancel()
            self._turn_task = None
        self.timeline.clear()


@dataclass(frozen=True)
class ConversationSetup:
    """Who talks and with what: the server's shared settings, engines and metrics, and the session's avatar,
    persona and voice. Every kind of session (talk, broadcast) is opened from one."""

    settings: Settings
    engines: EngineSet
    metrics: ServerMetrics
    avatar: Avatar
    persona: Persona
    voice: str

    def names(self) -> dict[str, str]:
        return {"avatar": self.avatar.name, "persona": self.persona.name, "voice": self.voice}


@dataclass
class ConversationMedia:
    """A conversation wired to its output timeline and its lip-sync thread: what every kind of session runs."""

    conversation: Conversation
    timeline: AVTimeline
    lipsync_executor: ThreadPoolExecutor

    @classmethod
    def open(cls, name: str, setup: ConversationSetup, emit: Emit) -> ConversationMedia:
        # One thread per session for lip-sync, so its stream object is only ever touched by one thread.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lipsync-{name[:6]}")
        media = setup.settings.media
        lipsync = setup.engines.lipsync.open_stream(setup.avatar, media.fps, media.sample_rate)
        timeline = AVTimeline(lipsync, executor, media.fps, media.sample_rate, media.idle_fps)
        conversation = Conversation(
            engines=setup.engines,
            turn_settings=setup.settings.turn,
            persona=setup.persona,
            voice=setup.voice,
            lipsync=lipsync,
            lipsync_executor=executor,
            timeline=timeline,
            metrics=setup.metrics,
            emit=emit,
        )
        return cls(conversation, timeline, executor)

    def close(self, metrics: ServerMetrics) -> None:
        self.conversation.close()
        self.timeline.stop()
        metrics.frames_sent.inc(self.timeline.frames_sent)
        metrics.frames_dropped.inc(self.timeline.video.dropped + self.timeline.audio.dropped)
        metrics.late_ticks.inc(self.timeline.late_ticks)
        self.lipsync_executor.shutdown(wait=False, cancel_futures=True)

"""Turn-taking over real WebRTC: speculative replies, coughs that do not end a reply, bounded memory."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterator, Sequence

import av
import numpy as np
import pytest

from engines.audio import silence_before_onset
from engines.base import ASREngine, ChatMessage, LLMEngine, Persona, Transcript
from media_server.http.state import METRICS, SESSIONS
from media_server.media.timeline import Playback
from media_server.media.webrtc import DecodeOnTheLoop
from media_server.testing.harness import BareConversation, bare_conversation, settings_with
from media_server.testing.loopback_client import MicrophoneTrack
from media_server.testing.speech_corpus import espeak

STORY = (
    "Once upon a time, a brave knight rode out to find the dragon of the northern hills. "
    "He crossed three rivers and a dark forest, and on the seventh day he reached the cave."
)


async def wait_for_state(client, state: str, after: float = 0.0, timeout: float = 30) -> float:
    """Wait for a state event; returns when it arrived."""
    event = await client.wait_for(lambda e: e.get("type") == "state" and e.get("state") == state, timeout, after)
    return next(at for at, e in client.events if e is event)


def silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


def trimmed(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Without espeak's leading and trailing silence, so the test controls the pause exactly."""
    voiced = np.flatnonzero(np.abs(audio) > threshold)
    return audio[voiced[0] : voiced[-1] + 1]


def project_voice(runtime, text: str) -> tuple[np.ndarray, int]:
    chunks = list(runtime.engines.tts.synthesize(text, runtime.engines.tts.default_voice))
    return np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate


async def test_a_speculative_reply_dropped_by_continued_speech_gives_one_answer(client_factory, server_app, runtime):
    client = await client_factory()
    first, rate = project_voice(runtime, "What is the capital")
    second, _ = project_voice(runtime, "of France?")
    # 250 ms of silence: longer than the speculative pause (96 ms), well short of the end of a turn (500 ms)
    # even where the VAD hears the soft end of "capital" as silence.
    spoken = [silence(0.3, rate), trimmed(first), silence(0.25, rate), trimmed(second), silence(1.0, rate)]
    client.microphone.say(np.concatenate(spoken), rate)

    reply = await client.wait_for(lambda e: e.get("type") == "reply" and e.get("final"), timeout=40)
    await client.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "speaking", timeout=30)
    finals = [e for e in client.events_of("transcript") if e.get("final")]
    # One question, with what was said after the pause in it (Whisper may mishear the splice: "A Friends?").
    heard = finals[0]["text"].lower().split()
    assert len(finals) == 1 and "capital" in " ".join(heard) and len(heard) > len("what is the capital".split())
    assert len([e for e in client.events_of("reply") if e.get("final")]) == 1 and reply["turn"] == finals[0]["turn"]
    assert server_app[METRICS].turns.labels("speculative_dropped")._value.get() >= 1


class FinalDecodes(ASREngine):
    """The real ASR engine, keeping the audio of every final (not partial) decode."""

    def __init__(self, engine: ASREngine) -> None:
        self.engine = engine
        self.audio: list[np.ndarray] = []

    def transcribe(self, audio: np.ndarray, *, partial: bool = False, language: str | None = None) -> Transcript:
        if not partial:
            self.audio.append(np.array(audio))
        return self.engine.transcribe(audio, partial=partial, language=language)


def fresh_conversation(runtime, engines=None, **changes: object) -> BareConversation:
    """A conversation of the default avatar and persona, with ``engines`` and these settings changed."""
    return bare_conversation(
        settings_with(runtime.settings, **changes),
        engines or runtime.engines,
        runtime.avatars.get("default"),
        runtime.personas["assistant"],
        runtime.engines.tts.default_voice,
    )


async def converse(runtime, engines, speech: np.ndarray, rate: int, **changes: object) -> list[dict]:
    """Speak ``speech`` into a fresh conversation with ``engines`` and these settings; its events
    until the final transcript."""
    bare = fresh_conversation(runtime, engines, **changes)
    events = bare.events
    microphone = MicrophoneTrack()
    microphone.say(np.concatenate([silence(0.3, rate), speech, silence(1.0, rate)]), rate)
    listening = asyncio.create_task(bare.conversation.consume_microphone(microphone))
    try:
        for _ in range(400):
            if any(e.get("type") == "transcript" and e.get("final") for e in events):
                return events
            await asyncio.sleep(0.05)
        raise AssertionError(f"no final transcript; events: {events}")
    finally:
        listening.cancel()
        microphone.stop()
        await bare.close()


def final_transcript(events: list[dict]) -> str:
    return next(e["text"] for e in events if e.get("type") == "transcript" and e.get("final"))


async def final_decode(runtime, speculative_silence_ms: int, speech: np.ndarray, rate: int) -> tuple[str, np.ndarray]:
    """Speak ``speech`` into a fresh conversation; the final transcript and the audio it was decoded from."""
    asr = FinalDecodes(runtime.engines.asr)
    engines = dataclasses.replace(runtime.engines, asr=asr)
    events = await converse(runtime, engines, speech, rate, speculative_silence_ms=speculative_silence_ms)
    return final_transcript(events), asr.audio[-1]


async def test_a_speculative_transcript_is_decoded_from_the_same_audio_as_the_confirmed_one(runtime):
    speech, rate = espeak("How many minutes are in an hour?", "en-gb", 185)
    speculative_text, speculative_audio = await final_decode(runtime, 160, speech, rate)
    confirmed_text, confirmed_audio = await final_decode(runtime, 0, speech, rate)
    # Same microphone audio in the same windows: only the tail's silence is made up, not heard.
    assert speculative_audio.shape == confirmed_audio.shape
    assert np.abs(speculative_audio - confirmed_audio).max() < 1e-3
    assert speculative_text == confirmed_text


class QuestionGuesses(LLMEngine):
    """The real LLM, keeping every partial question it was asked to read ahead."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.guesses: list[str] = []

    def stream_reply(
        self, persona: Persona, history: list[ChatMessage], cancelled: Callable[[], bool], context: str = ""
    ) -> Iterator[str]:
        return self.engine.stream_reply(persona, history, cancelled, context)

    def prepare(self, persona: Persona, history: Sequence[ChatMessage] = (), question_so_far: str = "") -> None:
        if question_so_far:
            self.guesses.append(question_so_far)
        self.engine.prepare(persona, history, question_so_far)


async def test_the_llm_reads_the_question_while_the_user_is_still_speaking(runtime):
    speech, rate = espeak("Which animal is known as the king of the jungle, and why is it called that?", "en-us", 140)
    llm = QuestionGuesses(runtime.engines.llm)
    events = await converse(runtime, dataclasses.replace(runtime.engines, llm=llm), speech, rate)
    partials = [e["text"] for e in events if e.get("type") == "transcript" and not e.get("final")]
    assert partials and llm.guesses
    assert set(llm.guesses) <= set(partials)  # each guess is a partial transcript shown to the user
    assert final_transcript(events).lower().startswith(llm.guesses[0].lower().split()[0])

    llm.guesses.clear()
    await converse(runtime, dataclasses.replace(runtime.engines, llm=llm), speech, rate, prefill_question=False)
    assert llm.guesses == []


async def test_a_cough_during_a_reply_pauses_it_and_the_reply_resumes(client_factory):
    client = await client_factory()
    client.send({"type": "say", "text": STORY})
    speaking_at = await wait_for_state(client, "speaking")
    cough, rate = espeak("ah", words_per_minute=300)
    voiced = np.flatnonzero(np.abs(cough) > 0.02)
    burst = cough[voiced[0] : voiced[0] + int(0.2 * rate)]  # 200 ms of voice: shorter than an interruption
    client.microphone.say(burst, rate)

    await client.wait_for(lambda e: e.get("type") == "resumed", timeout=15)
    await wait_for_state(client, "listening", after=speaking_at, timeout=60)
    assert not client.events_of("interrupted")
    assert not any(e.get("interrupted") for e in client.events_of("reply"))


async def test_memory_stays_bounded_over_fifty_turns(client_factory, server_app, runtime):
    client = await client_factory()
    conversation = server_app[SESSIONS].talks[client.session_id].conversation
    conversation.settings = settings_with(conversation.settings, max_history_messages=40)
    llm = runtime.engines.llm
    for turn in range(50):
        client.send({"type": "text", "text": f"Question number {turn}: tell me something about the number {turn}."})
        await client.wait_for(
            lambda e, n=turn + 1: e.get("type") == "reply" and e.get("final") and e.get("turn") == n, 30
        )
    assert len(conversation.history) <= 40
    prompt_tokens = llm.count_tokens(llm.build_prompt(conversation.persona, conversation.history))
    preamble_tokens = llm.count_tokens(llm.build_prompt(conversation.persona, conversation.history[-1:]))
    assert prompt_tokens <= llm._settings.max_history_tokens + preamble_tokens


class LateTaker:
    """A WebRTC sender that takes each packet (``packet_s`` long) ``lag_s`` after its time, as a starved one does."""

    def __init__(self, take: Callable[[], Awaitable[av.Packet]], packet_s: float, lag_s: float) -> None:
        self.take, self.packet_s, self.lag_s = take, packet_s, lag_s
        self.first_due: float | None = None
        self.taken = 0

    async def __call__(self) -> av.Packet:
        loop = asyncio.get_running_loop()
        if self.first_due is None:
            self.first_due = loop.time() + self.lag_s
        await asyncio.sleep(max(0.0, self.first_due + self.taken * self.packet_s - loop.time()))
        self.taken += 1
        return await self.take()


@pytest.mark.parametrize(("guard", "sender_lag_s"), [(True, 0.0), (False, 0.0), (True, 0.7)])
async def test_the_avatar_does_not_interrupt_itself_through_the_speakers(
    client_factory, server_app, guard, sender_lag_s
):
    client = await client_factory(echo_gain=0.5)  # the client's mic hears the avatar, 150 ms late
    session = server_app[SESSIONS].talks[client.session_id]
    conversation = session.conversation
    if not guard:
        conversation.listener.echo_guard = None
    if sender_lag_s:
        # A busy machine: the WebRTC sender takes each packet of the avatar's audio late, so it is sent
        # (and echoed) later than the timeline played it. The guard must compare with what was sent, and when.
        session.output.audio.recv = LateTaker(session.output.audio.recv, session.output.audio_packet_s, sender_lag_s)
    echo_windows = server_app[METRICS].echo_windows._value.get()
    client.send({"type": "say", "text": STORY})
    speaking_at = await wait_for_state(client, "speaking")
    await wait_for_state(client, "listening", after=speaking_at, timeout=60)
    if guard:
        assert not client.events_of("interrupted") and server_app[METRICS].echo_windows._value.get() > echo_windows
    else:  # the control: without the guard the avatar's own voice cuts it off
        assert client.events_of("interrupted")


async def test_the_microphone_waits_in_aiortcs_jitter_buffer_only_as_long_as_configured(
    client_factory, server_app, runtime
):
    client = await client_factory()
    client.microphone.say(silence(0.5, 16000), 16000)
    session = server_app[SESSIONS].talks[client.session_id]
    for _ in range(100):
        receivers = [t.receiver for t in session.pc.getTransceivers() if t.kind == "audio" and t.receiver.track]
        if receivers and session.has_microphone:
            break
        await asyncio.sleep(0.05)
    buffer = receivers[0]._RTCRtpReceiver__jitter_buffer  # the setting aiortc does not expose
    assert buffer._prefetch == runtime.settings.media.mic_jitter_buffer_packets == 1


async def test_the_microphone_is_decoded_on_the_event_loop_not_in_a_thread_of_its_own(client_factory, server_app):
    client = await client_factory()
    session = server_app[SESSIONS].talks[client.session_id]
    receiver = next(t.receiver for t in session.pc.getTransceivers() if t.kind == "audio")
    listener = session.conversation.listener
    heard = listener.audio_time
    client.microphone.say(*espeak("Hello there.", "en-us", 160))
    await asyncio.sleep(1.5)
    assert listener.audio_time > heard + 1.0  # the microphone is heard, in real time,
    decoder_queue = receiver._RTCRtpReceiver__decoder_queue
    assert isinstance(decoder_queue, DecodeOnTheLoop) and decoder_queue.empty()  # and nothing waits for aiortc's thread
    thread = receiver._RTCRtpReceiver__decoder_thread
    await session.close()
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()  # which still ends with the session


async def first_reply_audio(runtime, text: str, **changes: object) -> np.ndarray:
    """The audio of the first three frames a fresh conversation plays when it says ``text``."""
    bare = fresh_conversation(runtime, **changes)
    ticks: list[np.ndarray] = []
    started: list[int] = []
    bare.output.add_frame_listener(lambda picture, audio: ticks.append(audio))
    bare.output.add_playback_listener(
        lambda event: started.append(len(ticks) - 1) if event.kind is Playback.STARTED else None
    )
    player = asyncio.create_task(bare.output.run())
    try:
        bare.conversation.say(text)
        for _ in range(400):
            if started and len(ticks) >= started[0] + 3:
                return np.concatenate(ticks[started[0] : started[0] + 3])
            await asyncio.sleep(0.05)
        raise AssertionError("no reply frames")
    finally:
        player.cancel()
        await bare.close()


async def test_a_reply_starts_at_its_first_sound(runtime):
    text = "I don't know."
    voice, rate = project_voice(runtime, text)
    assert silence_before_onset(voice, rate) > 0.025 * rate  # Piper's joe leads in with silence
    trimmed_start = await first_reply_audio(runtime, text)
    untrimmed_start = await first_reply_audio(runtime, text, trim_leading_silence=False)
    output_rate = runtime.settings.media.sample_rate
    assert np.abs(trimmed_start).max() > 0.05  # the reply's voice, not silence
    assert silence_before_onset(trimmed_start, output_rate) == 0  # at most the 10 ms kept before the sound
    assert silence_before_onset(untrimmed_start, output_rate) > 0.015 * output_rate


SHORT_SENTENCES = (
    "The knight rode out at dawn. He crossed a river. He rode through a forest. "
    "He climbed a hill. He found the cave. The dragon was asleep."
)


def played_through(events: list[dict]) -> bool:
    states = [e["state"] for e in events if e.get("type") == "state"]
    return "speaking" in states and states[-1] == "listening"


async def most_frames_queued_while_saying(runtime, text: str, **changes: object) -> int:
    """The most frames queued ahead of playback at once while a fresh conversation says ``text``."""
    bare = fresh_conversation(runtime, **changes)
    events = bare.events
    player = asyncio.create_task(bare.output.run())
    most = 0
    try:
        bare.conversation.say(text)
        async with asyncio.timeout(120):
            while not played_through(events):
                most = max(most, bare.output.queued_frames)
                await asyncio.sleep(0.02)
    finally:
        player.cancel()
        await bare.close()
    assert not any(e.get("type") == "interrupted" for e in events)
    return most


async def test_speech_is_synthesised_only_so_far_ahead_of_playback(runtime):
    fps = runtime.settings.media.fps
    unlimited = await most_frames_queued_while_saying(runtime, SHORT_SENTENCES, speak_ahead_s=0)
    limited = await most_frames_queued_while_saying(runtime, SHORT_SENTENCES, speak_ahead_s=1.0)
    longest_sentence_frames = 2.5 * fps  # "The knight rode out at dawn." with its pauses
    print(f"\nmost frames queued ahead: {unlimited} without a limit, {limited} with 1 s")
    assert unlimited > 1.0 * fps + longest_sentence_frames  # the whole story races ahead
    assert limited <= 1.0 * fps + longest_sentence_frames

"""The conversation's state machine on scripted engines: turns, speculative replies, barge-in, coughs,
deadlines, pacing. The output clock is stepped by the test, so each case runs in milliseconds and comes
out the same however busy the machine is."""

from __future__ import annotations

import asyncio

from media_server.testing.fakes import (
    ScriptedLLM,
    ToneTTS,
)


async def test_a_typed_turn_goes_thinking_speaking_listening_with_every_event_in_order(scripted) -> None:
    s = scripted()
    turn = s.conversation.submit_text("What is the capital of France?")
    await s.until(s.has("reply:final"))
    assert s.types() == ["transcript:typed", "state:thinking", "reply:delta", "reply:delta", "reply:delta", "reply:final"]
    await s.until(s.has("state:listening"), ticking=True)
    assert s.types()[6:] == ["state:speaking", "metrics:latency", "spoken", "metrics:gap", "state:listening"]
    latency = next(e for e in s.events if e["type"] == "metrics" and "latency_ms" in e)["latency_ms"]
    assert list(latency) == ["first_token", "first_clause", "first_tts_audio", "first_lipsync_frame", "first_audio_sent"]
    assert (await turn.outcome).text == "The capital of France is Paris."
    # Every speech frame played once, in order, then the avatar idles again.
    spoken = [number for number in s.pictures if number]
    assert spoken == list(range(1, len(spoken) + 1)) and s.pictures[-1] == spoken[-1]
    assert [m.role for m in s.conversation.history] == ["user", "assistant"]


async def test_a_picture_is_sent_when_it_changes_and_a_still_one_again_only_at_idle_fps(scripted) -> None:
    s = scripted()
    for _ in range(2 * s.output.still_stride + 1):
        await s.output.play_tick()
    assert s.output.frames_sent == 3  # the first idle picture, then the same again every 1/idle_fps s
    assert s.pictures == [0]  # listeners hear of a picture only when it changes
    sent = s.output.frames_sent
    s.conversation.say("Welcome to the stream!")
    await s.until(s.has("state:listening"), ticking=True)
    spoken = [number for number in s.pictures if number]
    assert spoken and s.output.frames_sent >= sent + len(spoken)  # every speech frame goes out


async def test_said_text_is_spoken_as_it_is_without_the_llm(scripted) -> None:
    s = scripted()
    s.conversation.say("Welcome to the stream!")
    await s.until(s.has("state:listening"), ticking=True)
    assert s.types() == [
        "state:thinking", "reply:delta", "reply:final", "state:speaking", "metrics:latency", "spoken", "metrics:gap",
        "state:listening",
    ]
    assert s.llm.asked == [] and s.tts.spoken[0][0] == "Welcome to the stream!"


async def test_a_spoken_turn_is_prepared_in_the_users_pause_and_shown_only_once_confirmed(scripted) -> None:
    s = scripted()
    await s.hear(1.0)
    await s.hear(0.15, probability=0.0)  # a short pause: the reply is prepared speculatively
    await s.until(lambda: s.llm.asked != [] and s.output.queued_frames == 0 and s.tts.spoken != [])
    assert s.types() == [], "a speculative turn shows nothing"
    await s.hear(0.4, probability=0.0)  # the silence goes on: the turn is confirmed
    await s.until(s.has("reply:final"))
    assert s.types()[:3] == ["state:thinking", "transcript:final", "reply:delta"]
    assert len(s.llm.asked) == 1, "the confirmed turn is the speculative one, not a second reply"
    await s.until(s.has("state:listening"), ticking=True)
    assert "state:speaking" in s.types()


async def test_a_speculative_turn_is_dropped_unseen_when_the_user_goes_on(scripted) -> None:
    s = scripted()
    await s.hear(1.0)
    await s.hear(0.15, probability=0.0)
    await s.until(lambda: len(s.llm.asked) == 1)
    await s.hear(0.5)  # ... and the user goes on talking
    await s.hear(0.6, probability=0.0)
    await s.until(s.has("reply:final"))
    assert s.types().count("state:thinking") == 1 and s.types().count("transcript:final") == 1
    assert len(s.llm.asked) == 2
    assert s.conversation.metrics.turns.labels("speculative_dropped")._value.get() == 1


async def test_speaking_over_the_avatar_pauses_it_then_interrupts_it_and_cancels_the_reply(scripted) -> None:
    s = scripted(llm=ScriptedLLM(["Once upon a time", " there was a knight.", " He rode out."], gated=True))
    s.llm.release(2)  # the reply's first sentence; the rest waits
    s.conversation.submit_text("Tell me a story.")
    await s.until(s.has("state:speaking"), ticking=True)
    await s.hear(0.1, tick=True)
    assert s.output.paused and "interrupted" not in s.types(), "the avatar pauses at once, before deciding"
    await s.hear(0.3, tick=True)
    await s.until(s.has("interrupted"))
    assert s.types()[-3:] == ["reply:final:interrupted", "interrupted", "state:listening"]
    interrupted = s.events[-2]
    assert interrupted["reason"] == "barge-in" and interrupted["stopped_after_ms"] >= 0
    assert s.output.queued_frames == 0 and not s.output.speaking and not s.output.paused
    await s.until(s.llm.cancelled_seen.is_set)  # the LLM stopped writing, not just the avatar talking
    assert s.conversation.history[-1].text == "Once upon a time there was a knight."


async def test_a_cough_over_the_avatar_pauses_it_and_it_resumes_where_it_stopped(scripted) -> None:
    s = scripted(tts=ToneTTS(seconds_per_word=0.3))
    s.conversation.say("A reply long enough to cough over it.")
    await s.until(s.has("state:speaking"), ticking=True)
    await s.hear(0.2, tick=True)  # shorter than an interruption
    assert s.output.paused
    held = max(s.pictures)  # the speech frame it stopped on (the pause may come before this tick plays anything)
    await s.hear(0.5, probability=0.0, tick=True)
    assert "resumed" in s.types() and not s.output.paused and "interrupted" not in s.types()
    await s.until(s.has("state:listening"), ticking=True)
    spoken = [number for number in s.pictures if number]
    assert spoken == list(range(1, len(spoken) + 1)), "nothing skipped, nothing repeated"
    assert spoken[-1] > held


async def test_a_new_message_while_the_avatar_speaks_interrupts_it(scripted) -> None:
    s = scripted(tts=ToneTTS(seconds_per_word=0.3))
    s.conversation.say("A reply long enough to be interrupted.")
    await s.until(s.has("state:speaking"), ticking=True)
    s.conversation.submit_text("Stop, another question.")
    interrupted = next(e for e in s.events if e["type"] == "interrupted")
    assert interrupted == {"type": "interrupted", "reason": "new message"}
    await s.until(s.has("state:listening"), ticking=True)
    assert s.types().count("reply:final") == 1 and s.types().count("reply:final:interrupted") == 1


async def test_an_engine_that_never_answers_fails_the_turn_by_its_deadline(scripted) -> None:
    s = scripted(llm=ScriptedLLM(gated=True), llm_first_token_s=0.2)
    turn = s.conversation.submit_text("Hello?")
    await s.until(s.has("error"))
    error = next(e for e in s.events if e["type"] == "error")
    assert error["code"] == "turn_failed" and "within 0.2 s (deadlines.llm_first_token_s)" in error["message"]
    assert s.types()[-1] == "state:listening" and (await turn.outcome).code == "turn_failed"  # type: ignore[union-attr]
    s.llm.gated = False  # the engine is back: the next turn works
    s.conversation.submit_text("Hello again?")
    await s.until(lambda: s.types().count("reply:final") == 1)


async def test_an_engine_failure_ends_the_turn_with_an_error_and_the_conversation_goes_on(scripted) -> None:
    s = scripted()
    s.llm.failure = RuntimeError("the model file is corrupt")
    s.conversation.submit_text("Hello?")
    await s.until(s.has("error"))
    assert "corrupt" in next(e for e in s.events if e["type"] == "error")["message"]
    s.llm.failure = None
    s.conversation.submit_text("Hello again?")
    await s.until(s.has("reply:final"))


async def test_speech_is_synthesised_only_so_far_ahead_of_playback(scripted) -> None:
    sentences = " ".join(f"Sentence number {n} is here." for n in range(12))
    s = scripted(tts=ToneTTS(seconds_per_word=0.1), speak_ahead_s=0.5)
    s.conversation.say(sentences)
    most = 0
    async with asyncio.timeout(10):
        while "state:listening" not in s.types():
            most = max(most, s.output.queued_frames)
            await s.output.play_tick()
            await asyncio.sleep(0.002)
    sentence_frames = 5 * 0.1 * s.output.fps
    assert most <= 0.5 * s.output.fps + sentence_frames
    assert [text for text, _ in s.tts.spoken] == [f"Sentence number {n} is here." for n in range(12)]


async def test_the_llm_waits_while_the_first_clause_is_synthesised(scripted) -> None:
    s = scripted(llm=ScriptedLLM(["The capital of France", " is Paris.", " It is a big city", " by a river."], gated=True))
    s.tts.hold.clear()
    s.conversation.submit_text("What is the capital of France?")
    s.llm.release(2)
    await s.until(lambda: len(s.tts.spoken) == 1)
    s.llm.release(2)
    await asyncio.sleep(0.2)
    # The first clause went to TTS, and the LLM holds its next words until it is synthesised: at most
    # the delta it was computing when the clause was queued comes out (when depends on thread timing).
    assert s.tts.spoken[0][0] == "The capital of France is Paris."
    assert s.types().count("reply:delta") <= 3 and s.llm.written <= 2
    s.tts.hold.set()
    await s.until(s.has("reply:final"))
    assert s.llm.written == 4

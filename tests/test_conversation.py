"""End to end over real WebRTC on loopback: speech in, transcript, reply, lip-synced audio and video out."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from media_server.http.state import SESSIONS
from media_server.testing.loopback_client import THUMBNAIL, LoopbackClient
from media_server.testing.speech_corpus import espeak, word_error_rate
from tests.test_turn_taking import STORY

QUESTION = "What is the capital of France?"
FPS = 25


def project_voice(runtime, text: str) -> tuple[np.ndarray, int]:
    """Speech from the project's own TTS, made at test time."""
    chunks = list(runtime.engines.tts.synthesize(text, runtime.engines.tts.default_voice))
    return np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate


def is_state(state: str):
    return lambda e: e.get("type") == "state" and e.get("state") == state


def final_reply(e: dict) -> bool:
    return e.get("type") == "reply" and e.get("final") is True


def mouth_brightness(client: LoopbackClient, runtime, start: float, end: float) -> np.ndarray:
    """Mean brightness of the mouth region of each received frame in [start, end): an open mouth is darker."""
    avatar = runtime.avatars.get("default")
    box = avatar.face_boxes[0]
    scale = THUMBNAIL / avatar.size[0]
    cx, cy = (v * scale for v in box.mouth_center)
    half = box.mouth_width * scale * 0.6
    values = [
        frame.gray[int(cy - half / 2) : int(cy + half), int(cx - half) : int(cx + half)].mean()
        for frame in client.recording.video
        if start <= frame.at < end
    ]
    return np.array(values)


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


async def test_spoken_question_gets_a_lip_synced_spoken_answer(client_factory, runtime):
    client = await client_factory()
    await asyncio.sleep(2.0)  # some idle time to compare the mouth against
    idle_end = time.monotonic()
    client.microphone.say(*project_voice(runtime, QUESTION))

    transcript = await client.wait_for(lambda e: e.get("type") == "transcript" and e.get("final"), timeout=30)
    assert word_error_rate(QUESTION, transcript["text"]) <= 0.2, transcript["text"]
    reply = await client.wait_for(final_reply, timeout=30)
    assert reply["text"]
    assert client.events_of("reply")[0].get("final") is False  # the reply streamed as deltas first
    speaking = await client.wait_for(is_state("speaking"), timeout=30)
    speaking_at = next(at for at, e in client.events if e is speaking)
    await client.wait_for(is_state("listening"), timeout=60, after=speaking_at)
    listening_at = time.monotonic()
    metrics = next(e["latency_ms"] for e in client.events_of("metrics") if "latency_ms" in e)
    gaps = [e["longest_gap_ms"] for e in client.events_of("metrics") if "longest_gap_ms" in e]
    assert len(gaps) == 1 and gaps[0] >= 0
    assert set(metrics) >= {"transcript", "first_token", "first_clause", "first_tts_audio", "first_lipsync_frame", "first_audio_sent"}

    reply_audio = client.recording.audio_between(speaking_at, listening_at)
    idle_audio = client.recording.audio_between(idle_end - 1.5, idle_end)
    assert rms(reply_audio) > 0.02 and rms(idle_audio) < 0.003

    speaking_frames = [f for f in client.recording.video if speaking_at + 0.2 <= f.at < listening_at - 0.2]
    assert np.median(np.diff([f.pts for f in speaking_frames])) == 90000 // FPS
    seconds = speaking_frames[-1].at - speaking_frames[0].at
    assert 0.8 * FPS <= (len(speaking_frames) - 1) / seconds <= 1.2 * FPS
    idle_steps = np.diff([f.pts for f in client.recording.video if idle_end - 1.5 <= f.at < idle_end])
    assert all(step % (90000 // FPS) == 0 for step in idle_steps)  # on the tick clock, only when it changed,
    assert max(idle_steps) <= 90000 // runtime.settings.media.idle_fps  # or at idle_fps while it stays still

    speaking_mouth = mouth_brightness(client, runtime, speaking_at, listening_at)
    idle_mouth = mouth_brightness(client, runtime, idle_end - 1.5, idle_end)
    assert speaking_mouth.std() > 3 * max(idle_mouth.std(), 0.3), (speaking_mouth.std(), idle_mouth.std())


async def test_typed_message_gets_a_spoken_answer_and_follow_up_remembers(client_factory, runtime, server_app):
    client = await client_factory()
    client.send({"type": "text", "text": "My name is Alice."})
    first = await client.wait_for(final_reply, timeout=30)
    await client.wait_for(is_state("speaking"), timeout=30)
    sent = time.monotonic()
    client.send({"type": "text", "text": "What is my name?"})
    await client.wait_for(final_reply, timeout=30, after=sent)
    speaking = await client.wait_for(is_state("speaking"), timeout=30, after=sent)
    speaking_at = next(at for at, e in client.events if e is speaking)
    await client.wait_for(is_state("listening"), timeout=60, after=speaking_at)
    assert rms(client.recording.audio_between(speaking_at, time.monotonic())) > 0.02
    history = server_app[SESSIONS].talks[client.session_id].conversation.history
    assert [m.role for m in history][:2] == ["user", "assistant"]
    assert history[0].text == "My name is Alice." and history[1].text.startswith(first["text"][:10])
    assert history[2].text == "What is my name?"


async def test_speaking_over_the_avatar_stops_it_and_the_new_question_is_answered(client_factory, runtime, server_app):
    client = await client_factory()
    client.send({"type": "say", "text": STORY})
    speaking = await client.wait_for(is_state("speaking"), timeout=30)
    speaking_at = next(at for at, e in client.events if e is speaking)
    conversation = server_app[SESSIONS].talks[client.session_id].conversation
    story_turn = conversation._turn_task
    await asyncio.sleep(0.8)
    client.microphone.say(*espeak("Stop. How many legs does a spider have?", words_per_minute=150))

    interrupted = await client.wait_for(lambda e: e.get("type") == "interrupted", timeout=15, after=speaking_at)
    interrupted_at = next(at for at, e in client.events if e is interrupted)
    assert interrupted["reason"] == "barge-in" and interrupted["stopped_after_ms"] < 1000
    # The story's turn is over and nothing of it is queued; a task running now is the spider question's
    # (on a busy machine the user's pause after "Stop." may already have started it).
    assert story_turn is not None and story_turn.done() and conversation._turn_task is not story_turn
    assert server_app[SESSIONS].talks[client.session_id].output.queued_frames == 0
    assert client.events_of("reply", after=speaking_at)[-1].get("interrupted") is True

    transcript = await client.wait_for(
        lambda e: e.get("type") == "transcript" and e.get("final"), timeout=30, after=interrupted_at
    )
    assert "spider" in transcript["text"].lower()
    answer = await client.wait_for(is_state("speaking"), timeout=30, after=interrupted_at)
    answer_at = next(at for at, e in client.events if e is answer)
    # Nothing of the interrupted reply is heard after the interruption.
    assert rms(client.recording.audio_between(interrupted_at + 0.2, answer_at)) < 0.003


async def test_two_sessions_hold_independent_conversations(client_factory):
    first, second = await client_factory(), await client_factory(persona="guide")
    first.send({"type": "text", "text": "What is the capital of France?"})
    second.send({"type": "text", "text": "Who painted the Mona Lisa?"})
    reply_one, reply_two = await asyncio.gather(first.wait_for(final_reply, 60), second.wait_for(final_reply, 60))
    transcripts_one = " ".join(e["text"] for e in first.events_of("transcript"))
    transcripts_two = " ".join(e["text"] for e in second.events_of("transcript"))
    assert "France" in transcripts_one and "Mona Lisa" not in transcripts_one
    assert "Mona Lisa" in transcripts_two and "France" not in transcripts_two
    assert first.events_of("session")[0]["persona"] == "assistant"
    assert second.events_of("session")[0]["persona"] == "guide"
    assert reply_one["turn"] == reply_two["turn"] == 1


@pytest.mark.parametrize("message", ['{"type": "dance"}', "not json", '{"type": "text", "text": ""}'])
async def test_bad_messages_get_error_events_and_the_session_goes_on(client_factory, message):
    client = await client_factory()
    client._channel.send(message)
    error = await client.wait_for(lambda e: e.get("type") == "error", timeout=10)
    assert error["code"] == "bad_message" and error["message"]
    client.send({"type": "ping"})
    await client.wait_for(lambda e: e.get("type") == "pong", timeout=10)

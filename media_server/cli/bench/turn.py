"""``facecast bench turn``: talk to a real server over real WebRTC and report where the time goes.

The server runs as its own process (``facecast serve``), as in production, so its memory and CPU
can be read from /proc. Questions are synthesised here with two different voices and speeds, in the
language of the persona each configuration talks to (``--variant server.default_persona=german_teacher``:
German questions spoken by espeak-ng's German voice at two speeds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np

from engines.base import TTSEngine, primary_language
from engines.registry import create_engine
from media_server.cli.bench.output import percentiles
from media_server.cli.bench.server import ServerProcess, free_ports, quiet_client
from media_server.config import ConfigError, Settings
from media_server.metrics import STAGES
from media_server.testing.llama_server import running_llama_server
from media_server.testing.loopback_client import LoopbackClient
from media_server.testing.speech_corpus import QUESTIONS, QUESTIONS_BY_LANGUAGE, espeak, word_error_rate

IDLE_SESSIONS = 3
INTERRUPTED_STORY = (
    "Let me tell you a long story. Once upon a time, a brave knight rode out to find the dragon of the "
    "northern hills, and he crossed three rivers and a dark forest before he reached its cave."
)
IDLE_MEASURE_S = 10.0
LONG_CONVERSATION_WINDOW = 5  # turns at each end of the long conversation compared
ESPEAK_VOICES = (("en-us", 140), ("en-gb", 185))
OTHER_LANGUAGE_SPEEDS = (120, 150)  # words per minute of espeak-ng's voice for questions in other languages
GREETING_WAIT_S = 1.0  # a persona's greeting has started by then, if it has one
BARGE_IN_QUIET_S = 0.4  # longer than any pause between the avatar's words
DEFAULT = "default"
LLAMA_SERVER_AUTO = "llm.base_url=auto"


def _voices(tts: TTSEngine, n: int) -> list[tuple[str, str, np.ndarray, int]]:
    """(question, voice label, audio, rate), cycling the project's Piper voice and espeak-ng at two
    speeds and accents; past the end of the corpus each question comes back in another voice."""
    clips = []
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)]
        voice = (i + i // len(QUESTIONS)) % (len(ESPEAK_VOICES) + 1)
        if voice == 0:
            chunks = list(tts.synthesize(question, tts.default_voice))
            audio, rate, label = np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate, "piper-joe"
        else:
            accent, speed = ESPEAK_VOICES[voice - 1]
            audio, rate = espeak(question, accent, speed)
            label = f"espeak-{accent}-{speed}wpm"
        clips.append((question, label, audio, rate))
    return clips


def _clips_in(language: str, n: int, tts: TTSEngine) -> list[tuple[str, str, np.ndarray, int]]:
    """``n`` questions in ``language`` (a persona's): English in Piper's and espeak-ng's voices (``_voices``),
    another language in espeak-ng's voice for it at two speeds."""
    code = primary_language(language)
    if code == "en":
        return _voices(tts, n)
    questions = QUESTIONS_BY_LANGUAGE.get(code)
    if questions is None:
        known = ", ".join(QUESTIONS_BY_LANGUAGE)
        raise ConfigError(f"bench turn has no questions in {language!r}; it has them in: {known}")
    clips = []
    for i in range(n):
        speed = OTHER_LANGUAGE_SPEEDS[(i + i // len(questions)) % len(OTHER_LANGUAGE_SPEEDS)]
        question = questions[i % len(questions)]
        clips.append((question, f"espeak-{code}-{speed}wpm", *espeak(question, code, speed)))
    return clips


def _persona_language(settings: Settings, variant: list[str]) -> str:
    """The language of the persona a configuration's sessions talk to (its ``server.default_persona``)."""
    chosen = dict(pair.partition("=")[::2] for pair in variant).get("server.default_persona")
    persona = settings.personas.get(chosen or settings.server.default_persona)
    if persona is None:
        raise ConfigError(f"server.default_persona {chosen!r} is not one of the personas: {', '.join(settings.personas)}")
    return persona.language


async def _ask(client: LoopbackClient, question: str, audio: np.ndarray, rate: int) -> dict[str, object]:
    start = time.monotonic()
    client.microphone.say(audio, rate)
    transcript = await client.wait_for(lambda e: e.get("type") == "transcript" and e.get("final"), 60, start)
    metrics = await client.wait_for(lambda e: e.get("type") == "metrics" and "latency_ms" in e, 60, start)
    playback = await client.wait_for(lambda e: e.get("type") == "metrics" and "longest_gap_ms" in e, 90, start)
    reply = await client.wait_for(lambda e: e.get("type") == "reply" and e.get("final"), 30, start)
    speech_end = client.microphone.clip_ended[-1]
    heard = client.recording.first_loud_audio_after(speech_end)
    await asyncio.sleep(0.5)
    return {
        "question": question,
        "transcript": transcript["text"],
        "wer": word_error_rate(question, transcript["text"]),
        "reply": reply.get("text", ""),
        "server_ms": metrics["latency_ms"],
        "longest_gap_ms": playback["longest_gap_ms"],
        "client_end_of_speech_to_audio_ms": round((heard - speech_end) * 1000, 1) if heard else None,
    }


async def _idle_cost(server: ServerProcess) -> dict[str, float]:
    await asyncio.sleep(2)
    rss_before, cpu_before = server.rss_mb(), server.cpu_seconds()
    await asyncio.sleep(IDLE_MEASURE_S)
    baseline_cpu = (server.cpu_seconds() - cpu_before) / IDLE_MEASURE_S
    clients = [quiet_client(server) for _ in range(IDLE_SESSIONS)]
    for client in clients:
        await client.connect()
    await asyncio.sleep(3)
    rss_after, cpu_start = server.rss_mb(), server.cpu_seconds()
    await asyncio.sleep(IDLE_MEASURE_S)
    idle_cpu = (server.cpu_seconds() - cpu_start) / IDLE_MEASURE_S
    for client in clients:
        await client.close()
    return {
        "server_rss_mb": round(rss_before, 1),
        "rss_per_idle_session_mb": round((rss_after - rss_before) / IDLE_SESSIONS, 1),
        "cpu_per_idle_session_pct_of_core": round(100 * (idle_cpu - baseline_cpu) / IDLE_SESSIONS, 2),
    }


async def _greeted(client: LoopbackClient) -> None:
    """Wait out the persona's greeting, if it has one: a question over it would interrupt it."""
    await asyncio.sleep(GREETING_WAIT_S)
    if client.events_of("reply"):
        speaking = await client.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "speaking", 60)
        spoke_at = next(at for at, e in client.events if e is speaking)
        await client.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "listening", 60, spoke_at)


async def _run_turns(servers: dict[str, ServerProcess], clips: dict[str, list]) -> dict[str, list[dict[str, object]]]:
    """The i-th question to every configuration in turn (in its persona's language), so that a change in
    the machine's load (a VM's neighbours) hits all of them alike; each answer in its own session, with
    no other session open."""
    results: dict[str, list[dict[str, object]]] = {name: [] for name in servers}
    order = list(servers.items())
    for round_number in range(len(next(iter(clips.values())))):
        shift = round_number % len(order)  # no configuration always goes first
        for name, server in order[shift:] + order[:shift]:
            question, label, audio, rate = clips[name][round_number]
            client = quiet_client(server)
            await client.connect()
            await _greeted(client)
            try:
                result = await _ask(client, question, audio, rate)
            finally:
                await client.close()
            result["voice"] = label
            results[name].append(result)
            print(
                f"  {name[:24]:>24}  {label:>20}  {result['server_ms'].get('first_audio_sent', float('nan')):7.0f} ms"
                f"  {result['transcript']}",
                file=sys.stderr,
            )
    return results


def summarise(turns: list[dict[str, object]], idle: dict[str, float]) -> dict[str, object]:
    stages = {stage: percentiles([t["server_ms"][stage] for t in turns if stage in t["server_ms"]]) for stage in STAGES}
    client_side = [t["client_end_of_speech_to_audio_ms"] for t in turns if t["client_end_of_speech_to_audio_ms"]]
    return {
        "turns": len(turns),
        "first_turn_first_audio_sent_ms": turns[0]["server_ms"].get("first_audio_sent") if turns else None,
        "stages_from_end_of_speech_ms": stages,
        "client_end_of_speech_to_first_audio_ms": percentiles(client_side),
        "longest_gap_in_a_reply_ms": percentiles([t["longest_gap_ms"] for t in turns]),
        "mean_wer": round(statistics.mean(t["wer"] for t in turns), 3),
        "mean_wer_by_voice": {
            voice: round(statistics.mean(t["wer"] for t in turns if t["voice"] == voice), 3)
            for voice in sorted({t["voice"] for t in turns})
        },
        **idle,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


async def _barge_ins(server: ServerProcess, count: int) -> dict[str, list[float]]:
    """Interrupt a long verbatim reply ``count`` times, at varied moments and in two voices; for each,
    how long the avatar's audio went on after the first voiced sample of the interruption, as the
    client heard it and as the server reports it."""
    client = quiet_client(server)
    await client.connect()
    interruptions = [espeak("Wait, stop please.", "en-us", 170), espeak("Hold on a moment.", "en-gb", 150)]
    heard: list[float] = []
    server_side: list[float] = []
    missed = 0
    try:
        for i in range(count):
            start = time.monotonic()
            client.send({"type": "say", "text": INTERRUPTED_STORY})
            await client.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "speaking", 60, start)
            await asyncio.sleep(0.8 + 0.13 * i)  # land on different phases of the speech
            spoken = time.monotonic()
            client.microphone.say(*interruptions[i % 2])
            try:
                event = await client.wait_for(
                    lambda e: e.get("type") == "interrupted" and e.get("reason") == "barge-in", 20, spoken
                )
            except TimeoutError:
                missed += 1  # the policy took the interruption for a cough and the avatar resumed
                continue
            if "stopped_after_ms" in event:
                server_side.append(event["stopped_after_ms"])
            await client.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "listening", 60, start)
            await asyncio.sleep(2.5)  # let the interruption's own turn pass
            voice = client.microphone.voice_started[-1]
            ended = client.recording.loud_audio_ended_after(voice, BARGE_IN_QUIET_S)
            if ended is not None:
                heard.append(round((ended - voice) * 1000, 1))
    finally:
        await client.close()
    if missed:
        print(f"  {missed} of {count} interruptions did not interrupt", file=sys.stderr)
    return {"heard": heard, "server": server_side}


async def _long_conversation(server: ServerProcess, count: int) -> dict[str, object]:
    """``count`` typed turns in one session, each sent as soon as the previous reply starts playing
    (so it interrupts it): does the first token come as fast at turn 50 as at turn 1?"""
    client = quiet_client(server)
    await client.connect()
    first_token: list[float] = []
    try:
        for i in range(count):
            start = time.monotonic()
            client.send({"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]})
            event = await client.wait_for(lambda e: e.get("type") == "metrics" and "latency_ms" in e, 60, start)
            first_token.append(event["latency_ms"]["first_token"])
    finally:
        await client.close()
    window = min(LONG_CONVERSATION_WINDOW, count)
    early, late = statistics.median(first_token[:window]), statistics.median(first_token[-window:])
    return {
        "turns": count,
        "first_token_ms_first_turns_p50": round(early, 1),
        "first_token_ms_last_turns_p50": round(late, 1),
        "last_over_first": round(late / early, 2),
        "first_token_ms_max": round(max(first_token), 1),  # the turn that drops old exchanges, if any is slow
        "first_token_ms": [round(ms) for ms in first_token],
    }


def _run_configurations(
    args: argparse.Namespace, variants: dict[str, list[str]], clips: dict[str, list]
) -> dict[str, object]:
    servers: dict[str, ServerProcess] = {}
    try:
        with free_ports(len(variants)) as ports:
            for (name, extra), port in zip(variants.items(), ports):
                servers[name] = ServerProcess(args, [f"server.max_sessions={IDLE_SESSIONS + 2}", *extra], port)
        for server in servers.values():
            server.wait_ready()
        default = servers[DEFAULT]
        idle = asyncio.run(_idle_cost(default))
        turns = asyncio.run(_run_turns(servers, clips))
        barge_ins = {
            name: asyncio.run(_barge_ins(server, args.barge_ins)) if args.barge_ins else {}
            for name, server in servers.items()
        }
        memory = asyncio.run(_long_conversation(default, args.long_turns)) if args.long_turns else {}
    finally:
        for server in servers.values():
            server.stop()
    results: dict[str, object] = {}
    for name in servers:
        summary = summarise(turns[name], idle if name == DEFAULT else {})
        if args.barge_ins:
            summary["barge_in_heard_stopping_after_ms"] = percentiles(barge_ins[name]["heard"])
            summary["barge_in_server_stopped_after_ms"] = percentiles(barge_ins[name]["server"])
        if memory and name == DEFAULT:
            summary["long_conversation"] = memory
        results[name] = {"summary": summary, "turns": turns[name]}
    return results


def _print_summary(summary: dict[str, object]) -> None:
    print(f"{'stage (from end of user speech)':<34}{'p50 ms':>10}{'p95 ms':>10}")
    rows = dict(summary["stages_from_end_of_speech_ms"])
    rows["first audio heard by the client"] = summary["client_end_of_speech_to_first_audio_ms"]
    rows["longest gap inside a reply"] = summary["longest_gap_in_a_reply_ms"]
    if "barge_in_heard_stopping_after_ms" in summary:
        rows["barge-in: client hears silence"] = summary["barge_in_heard_stopping_after_ms"]
        rows["barge-in: server stops audio"] = summary["barge_in_server_stopped_after_ms"]
    for stage, values in rows.items():
        print(f"{stage:<34}{values.get('p50', float('nan')):>10}{values.get('p95', float('nan')):>10}")
    for key in (
        "turns",
        "first_turn_first_audio_sent_ms",
        "mean_wer",
        "mean_wer_by_voice",
        "long_conversation",
        "server_rss_mb",
        "rss_per_idle_session_mb",
        "cpu_per_idle_session_pct_of_core",
    ):
        if key in summary:
            print(f"{key}: {summary[key]}")


def _on_llama_server(variants: dict[str, list[str]], stack: contextlib.ExitStack) -> dict[str, list[str]]:
    """Variants whose settings say ``llm.base_url=auto`` get llama-cpp-python's own OpenAI-compatible server on
    the embedded model, started here for the run (``llm.engine=openai,llm.base_url=auto``)."""
    if not any(LLAMA_SERVER_AUTO in extra for extra in variants.values()):
        return variants
    server = stack.enter_context(running_llama_server())
    served = f"llm.base_url={server.base_url}"
    return {name: [served if pair == LLAMA_SERVER_AUTO else pair for pair in extra] for name, extra in variants.items()}


def main(args: argparse.Namespace, settings: Settings) -> None:
    variants = {DEFAULT: [], **{v: v.split(",") for v in args.variant}}
    languages = {name: _persona_language(settings, variant) for name, variant in variants.items()}
    tts = create_engine("tts", settings.tts.engine, settings.tts.options)
    try:
        by_language = {language: _clips_in(language, args.n, tts) for language in set(languages.values())}
    finally:
        tts.close()
    clips = {name: by_language[language] for name, language in languages.items()}
    with contextlib.ExitStack() as stack:
        results = _run_configurations(args, _on_llama_server(variants, stack), clips)
    if args.json:
        print(json.dumps(results))
        return
    for name, result in results.items():
        print(f"\n== {name} ==")
        _print_summary(result["summary"])
    if args.variant:
        base = results[DEFAULT]["summary"]["stages_from_end_of_speech_ms"]["first_audio_sent"]["p50"]
        print("\nfirst audio sent, p50, against the default configuration (same clips, same run):")
        for name, result in results.items():
            p50 = result["summary"]["stages_from_end_of_speech_ms"]["first_audio_sent"]["p50"]
            wer = result["summary"]["mean_wer"]
            barge_in = result["summary"].get("barge_in_heard_stopping_after_ms", {})
            print(
                f"  {name:<50}{p50:>8} ms  x{p50 / base:.2f}  mean WER {wer}"
                f"  barge-in heard p50/p95 {barge_in.get('p50')}/{barge_in.get('p95')} ms"
            )

"""``facecast bench soak``: one real session talking for a long time, watched for what creeps.

A question every ``--every`` seconds (every third one a barge-in over a long reply) to a server process;
every minute, the server's memory, threads and open files, the output clock's late ticks, and how far
the avatar's audio has moved against its video at the client (it must not drift). Figures for one run
are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import numpy as np

from engines.registry import create_engine
from media_server.cli.bench.output import print_summary
from media_server.cli.bench.server import ServerProcess, free_ports
from media_server.config import Settings
from media_server.testing.loopback_client import LoopbackClient
from media_server.testing.speech_corpus import QUESTIONS, espeak

STORY = "Let me tell you a long story about a knight who rode out at dawn to find the dragon of the hills."
SAMPLE_S = 60.0


def _clips(settings: Settings) -> list[tuple[np.ndarray, int]]:
    tts = create_engine("tts", settings.tts.engine, settings.tts.options)
    try:
        piper = [list(tts.synthesize(q, tts.default_voice)) for q in QUESTIONS[::2]]  # type: ignore[attr-defined]
    finally:
        tts.close()
    voiced = [(np.concatenate([c.audio for c in chunks]), chunks[0].sample_rate) for chunks in piper]
    return voiced + [espeak(q, "en-gb", 160) for q in QUESTIONS[1::2]]


async def _turn(client: LoopbackClient, number: int, clips: list[tuple[np.ndarray, int]]) -> str:
    start = time.monotonic()
    if number % 3 == 2:  # a barge-in over a long reply
        client.send({"type": "say", "text": STORY})
        await client.wait_for(lambda e: e.get("type") == "state" and e.get("state") == "speaking", 60, start)
        await asyncio.sleep(1.0)
        client.microphone.say(*espeak("Wait, stop please.", "en-us", 170))
        await client.wait_for(lambda e: e.get("type") == "interrupted", 30, start)
        return "barge-in"
    client.microphone.say(*clips[number % len(clips)])
    await client.wait_for(lambda e: e.get("type") == "metrics" and "longest_gap_ms" in e, 90, start)
    return "question"


def _sample(server: ServerProcess, client: LoopbackClient, since: float, turns: dict[str, int]) -> dict[str, object]:
    offset = client.recording.av_offset_s(since)
    return {
        "minute": round((time.monotonic() - server.started) / 60, 1),
        "rss_mb": round(server.rss_mb(), 1),
        "threads": server.threads(),
        "open_fds": server.open_fds(),
        "late_ticks": int(server.metric("facecast_late_ticks_total")),
        "av_offset_ms": None if offset is None else round(offset * 1000, 1),
        **turns,
    }


async def _soak(server: ServerProcess, minutes: float, every_s: float, clips: list) -> list[dict[str, object]]:
    client = LoopbackClient(server.url, keep_video=False, keep_audio=False, audio_jitter_buffer_packets=1)
    await client.connect()
    samples: list[dict[str, object]] = []
    turns = {"question": 0, "barge-in": 0, "failed": 0}
    deadline = time.monotonic() + minutes * 60
    next_turn = next_sample = time.monotonic()
    sampled_from = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if time.monotonic() >= next_turn:
                next_turn += every_s
                try:
                    turns[await _turn(client, sum(turns.values()), clips)] += 1
                except TimeoutError as error:
                    turns["failed"] += 1
                    print(f"  turn failed: {error}", file=sys.stderr)
            if time.monotonic() >= next_sample:
                samples.append(_sample(server, client, sampled_from, dict(turns)))
                print(f"  {json.dumps(samples[-1])}", file=sys.stderr)
                sampled_from, next_sample = time.monotonic(), next_sample + SAMPLE_S
            await asyncio.sleep(0.2)
        samples.append(_sample(server, client, sampled_from, dict(turns)))
    finally:
        await client.close()
    return samples


def summarise(samples: list[dict[str, object]]) -> dict[str, object]:
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    offsets = [s["av_offset_ms"] for s in samples if s["av_offset_ms"] is not None]
    return {
        "minutes": last["minute"],
        "turns": {key: last[key] for key in ("question", "barge-in", "failed")},
        "rss_mb_first_minute_to_last": [first["rss_mb"], last["rss_mb"]],
        "threads_min_max": [min(s["threads"] for s in samples), max(s["threads"] for s in samples)],
        "open_fds_min_max": [min(s["open_fds"] for s in samples), max(s["open_fds"] for s in samples)],
        "late_ticks": last["late_ticks"],
        "av_offset_ms_median_min_max": [
            round(statistics.median(offsets), 1) if offsets else None,
            min(offsets, default=None),
            max(offsets, default=None),
        ],
    }


def main(args: argparse.Namespace, settings: Settings) -> None:
    clips = _clips(settings)
    with free_ports(1) as [port]:
        server = ServerProcess(args, [], port)
    try:
        server.wait_ready()
        samples = asyncio.run(_soak(server, args.minutes, args.every, clips))
    finally:
        server.stop()
    summary = summarise(samples)
    print_summary({"summary": summary, "per_minute": {str(s["minute"]): s for s in samples}}, args.json, sections=True)

"""``facecast bench avatarchatbot``: OPEA's AvatarChatbot request against a real server process: a spoken
question of 2–3 s (16 kHz mono WAV, base64, ``max_tokens`` 64) to ``/v1/avatarchatbot``, timed from the
request to the MP4's path, and the real-time factor of the answer (seconds taken per second of video)."""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
import urllib.request

import av

from engines.audio import resample, wav_file
from media_server.cli.bench.output import print_summary
from media_server.cli.bench.server import ServerProcess, free_ports
from media_server.config import Settings
from media_server.testing.speech_corpus import QUESTIONS, espeak

QUESTION_RATE = 16000
MAX_TOKENS = 64
TIMEOUT_S = 600


def _video_seconds(path: str) -> float:
    with av.open(path) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


def _ask(url: str, wav: bytes) -> tuple[float, float]:
    """(seconds to the answer, seconds of answer video)."""
    body = json.dumps({"audio": base64.b64encode(wav).decode(), "max_tokens": MAX_TOKENS}).encode()
    request = urllib.request.Request(f"{url}/v1/avatarchatbot", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        path = json.load(response)
    return time.perf_counter() - started, _video_seconds(path)


def main(args: argparse.Namespace, settings: Settings) -> None:
    with free_ports(1) as (port,):
        server = ServerProcess(args, [], port)
    rows = []
    try:
        server.wait_ready()
        for question in QUESTIONS[: args.n]:
            speech = resample(*espeak(question), QUESTION_RATE)
            seconds, video = _ask(server.url, wav_file(speech, QUESTION_RATE))
            rows.append({"question": question, "question_s": len(speech) / QUESTION_RATE, "end_to_end_s": seconds,
                         "answer_video_s": video, "real_time_factor": seconds / video})  # fmt: skip
            print(f"  {question:<50} {seconds:6.2f} s for {video:5.2f} s of video", file=sys.stderr)
    finally:
        server.stop()
    summary = {
        key: {"p50": round(statistics.median(r[key] for r in rows), 2), "max": round(max(r[key] for r in rows), 2)}
        for key in ("question_s", "end_to_end_s", "answer_video_s", "real_time_factor")
    }
    title = f"/v1/avatarchatbot, {len(rows)} questions, lipsync.engine = {settings.lipsync.engine!r}"
    print_summary({title: summary}, args.json, sections=True)

"""``facecast bench capacity``: how many sessions one node holds, connected and speaking at once.

One server process, as in production, and loopback WebRTC clients in this process, on the same
machine. First more and more sessions stay connected and idle; then more and more of them speak at
once, round after round: each asks a typed question of the configured LLM (``--say``: the avatar says a
fixed sentence, no LLM). The climb stops at the first step where the server's output clock played a
tick late (``facecast_late_ticks_total``, counted live) or, speaking, where the first-audio latency p95
is more than twice one session's alone.

Per step: the server process's CPU (from /proc: the clients are not in it, though they run on the same
cores, and their own CPU is shown beside it), its memory and threads, its late ticks and the turns'
first-audio latency. Figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from media_server.cli.bench.output import percentiles
from media_server.cli.bench.server import ServerProcess, free_ports, quiet_client
from media_server.config import Settings
from media_server.testing.llama_server import running_llama_server
from media_server.testing.loopback_client import LoopbackClient
from media_server.testing.speech_corpus import QUESTIONS

SETTLE_S = 3.0  # after the step's sessions connect, before it is measured
CLOSE_TIMEOUT_S = 30.0  # for the server to close the sessions of the connected climb
TURN_TIMEOUT_S = 90.0
BETWEEN_ROUNDS_S = 0.5
LATENCY_LIMIT = 2.0  # a speaking step is over the limit once its p95 is this many times one session's
SAID = "Thank you for asking. Let me think about that for a moment, and then I will tell you what I know."
CPU_NOTE = (
    "server_cpu_pct: the server process's own CPU from /proc, % of one core; clients_cpu_pct: this "
    "process, the loopback clients, which share the same cores"
)


@dataclass(frozen=True)
class Plan:
    connected: tuple[int, ...]  # idle sessions, step by step
    speaking: tuple[int, ...]  # sessions speaking at once, step by step
    measure_s: float  # how long each idle step is measured
    rounds: int  # turns each speaking session takes per step


FULL = Plan(connected=(1, 2, 4, 6, 8, 12, 16, 20, 24, 32), speaking=(1, 2, 3, 4, 6, 8), measure_s=8.0, rounds=3)
QUICK = Plan(connected=(1, 2, 4, 8), speaking=(1, 2, 3), measure_s=4.0, rounds=2)


@dataclass
class Step:
    connected: int
    speaking: int
    seconds: float
    server_cpu_pct: float
    clients_cpu_pct: float
    rss_mb: float
    threads: int
    late_ticks: int
    first_audio_sent_ms: dict[str, float] = field(default_factory=dict)
    failed_turns: int = 0


class Meter:
    """The server's CPU, the clients' CPU and the late ticks from now until ``step``."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.started = time.monotonic()
        self.server_cpu = server.cpu_seconds()
        self.clients_cpu = time.process_time()
        self.late_ticks = late_ticks(server)

    def step(self, connected: int, speaking: int, latencies: list[float], failed: int = 0) -> Step:
        seconds = time.monotonic() - self.started
        return Step(
            connected=connected,
            speaking=speaking,
            seconds=round(seconds, 1),
            server_cpu_pct=round(100 * (self.server.cpu_seconds() - self.server_cpu) / seconds, 1),
            clients_cpu_pct=round(100 * (time.process_time() - self.clients_cpu) / seconds, 1),
            rss_mb=round(self.server.rss_mb(), 1),
            threads=self.server.threads(),
            late_ticks=late_ticks(self.server) - self.late_ticks,
            first_audio_sent_ms=percentiles(latencies),
            failed_turns=failed,
        )


def late_ticks(server: ServerProcess) -> int:
    return int(server.metric("facecast_late_ticks_total"))


async def connect_up_to(server: ServerProcess, clients: list[LoopbackClient], count: int) -> None:
    while len(clients) < count:
        client = quiet_client(server, keep_audio=False)
        await client.connect()
        clients.append(client)


async def close_all(server: ServerProcess, clients: list[LoopbackClient]) -> None:
    """Close the clients, and wait until the server has closed their sessions (so that tearing them down
    is not in the next step's measurement)."""
    for client in clients:
        await client.close()
    clients.clear()
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    while server.metric("facecast_sessions") > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)


async def connected_steps(server: ServerProcess, plan: Plan) -> tuple[list[Step], float]:
    """Idle sessions, more at each step, until a tick comes late; and the memory each session added."""
    clients: list[LoopbackClient] = []
    steps: list[Step] = []
    idle_rss = server.rss_mb()
    try:
        for count in plan.connected:
            await connect_up_to(server, clients, count)
            await asyncio.sleep(SETTLE_S)
            meter = Meter(server)
            await asyncio.sleep(plan.measure_s)
            steps.append(report(meter.step(count, 0, [])))
            if steps[-1].late_ticks:
                break
        rss_per_session = (steps[-1].rss_mb - idle_rss) / steps[-1].connected
    finally:
        await close_all(server, clients)
    return steps, round(rss_per_session, 1)


async def take_turn(client: LoopbackClient, text: str, say: bool) -> float | None:
    """One turn, to its end: its first-audio latency as the server measured it, or None if it failed."""
    start = time.monotonic()
    client.send({"type": "say" if say else "text", "text": text})
    try:
        metrics = await client.wait_for(lambda e: metrics_with(e, "latency_ms"), TURN_TIMEOUT_S, start)
        await client.wait_for(lambda e: metrics_with(e, "longest_gap_ms"), TURN_TIMEOUT_S, start)  # it played out
    except TimeoutError:
        return None
    return metrics["latency_ms"].get("first_audio_sent")


def metrics_with(event: dict, key: str) -> bool:
    return event.get("type") == "metrics" and key in event


async def speaking_step(server: ServerProcess, clients: list[LoopbackClient], rounds: int, say: bool) -> Step:
    """Every client takes a turn at the same moment, ``rounds`` times."""
    meter = Meter(server)
    latencies: list[float] = []
    failed = 0
    for round_number in range(rounds):
        first = round_number * len(clients)
        texts = [SAID if say else QUESTIONS[(first + i) % len(QUESTIONS)] for i in range(len(clients))]
        results = await asyncio.gather(*(take_turn(c, text, say) for c, text in zip(clients, texts, strict=True)))
        latencies += [ms for ms in results if ms is not None]
        failed += sum(ms is None for ms in results)
        await asyncio.sleep(BETWEEN_ROUNDS_S)
    return meter.step(len(clients), len(clients), latencies, failed)


async def speaking_steps(server: ServerProcess, plan: Plan, say: bool) -> list[Step]:
    """Sessions speaking at once, more at each step, until a tick comes late, a turn fails, or the
    latency p95 is over LATENCY_LIMIT times one session's."""
    clients: list[LoopbackClient] = []
    steps: list[Step] = []
    try:
        for count in plan.speaking:
            await connect_up_to(server, clients, count)
            await asyncio.sleep(SETTLE_S)
            steps.append(report(await speaking_step(server, clients, plan.rounds, say)))
            if over_the_limit(steps[-1], steps[0]):
                break
    finally:
        await close_all(server, clients)
    return steps


def over_the_limit(step: Step, alone: Step) -> bool:
    p95, alone_p95 = step.first_audio_sent_ms.get("p95"), alone.first_audio_sent_ms.get("p95")
    slow = p95 is None or alone_p95 is None or p95 > LATENCY_LIMIT * alone_p95
    return bool(step.late_ticks or step.failed_turns or slow)


TABLE_HEADER = (
    f"{'connected':>9} {'speaking':>8} {'server CPU %':>12} {'clients CPU %':>13} {'RSS MB':>7} {'threads':>7}"
    f" {'late ticks':>10} {'first audio p50/p95 ms':>22} {'failed':>6}"
)


def table_row(step: Step) -> str:
    latency = step.first_audio_sent_ms
    first_audio = f"{latency['p50']:.0f}/{latency['p95']:.0f}" if latency else "-"
    return (
        f"{step.connected:>9} {step.speaking:>8} {step.server_cpu_pct:>12.1f} {step.clients_cpu_pct:>13.1f}"
        f" {step.rss_mb:>7.0f} {step.threads:>7} {step.late_ticks:>10} {first_audio:>22} {step.failed_turns:>6}"
    )


def report(step: Step) -> Step:
    print(table_row(step), file=sys.stderr, flush=True)
    return step


def summarise(connected: list[Step], rss_per_session: float, speaking: list[Step], plan: Plan) -> dict[str, object]:
    alone = speaking[0]
    within_speaking = [s for s in speaking if not over_the_limit(s, alone)]
    idle_ok = [s.connected for s in connected if not s.late_ticks]
    return {
        "connected_sessions_without_late_ticks": max(idle_ok, default=0),
        "connected_limit_reached": connected[-1].late_ticks > 0,
        "speaking_at_once_within_limits": max((s.speaking for s in within_speaking), default=0),
        "speaking_limit_reached": over_the_limit(speaking[-1], alone),
        "one_session_first_audio_sent_ms": alone.first_audio_sent_ms,
        "rss_per_connected_session_mb": rss_per_session,
        "cpu": CPU_NOTE,
        "connected_steps": [asdict(s) for s in connected],
        "speaking_steps": [asdict(s) for s in speaking],
        "plan": asdict(plan),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
    }


async def climb(server: ServerProcess, plan: Plan, say: bool) -> dict[str, object]:
    print(TABLE_HEADER, file=sys.stderr)
    connected, rss_per_session = await connected_steps(server, plan)
    speaking = await speaking_steps(server, plan, say)
    return summarise(connected, rss_per_session, speaking, plan)


def llm_server_settings(base_url: str, settings: Settings) -> list[str]:
    """The server's LLM as a client of llama.cpp's own OpenAI-compatible server, replies as long as the
    in-process LLM's."""
    length = settings.llm.options.get("max_tokens")
    return ["llm.engine=openai", f"llm.base_url={base_url}", *([f"llm.max_tokens={length}"] if length else [])]


def main(args: argparse.Namespace, settings: Settings) -> None:
    plan = QUICK if args.quick else FULL
    most = max(*plan.connected, *plan.speaking)
    extra = [f"server.max_sessions={most}", "server.offers_per_minute=0"]
    with contextlib.ExitStack() as stack:
        if args.llm_server:
            extra += llm_server_settings(stack.enter_context(running_llama_server()).base_url, settings)
        with free_ports(1) as [port]:
            server = ServerProcess(args, extra, port)
        stack.callback(server.stop)
        server.wait_ready()
        summary = asyncio.run(climb(server, plan, args.say))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(TABLE_HEADER)
    for step in (*summary.pop("connected_steps"), *summary.pop("speaking_steps")):
        print(table_row(Step(**step)))
    for key, value in summary.items():
        print(f"{key}: {value}")

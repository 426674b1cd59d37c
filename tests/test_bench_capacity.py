"""``facecast bench capacity``: where a climb stops, and a short climb against a real server process."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator

import pytest

from media_server.cli.bench.capacity import Plan, Step, climb, over_the_limit
from media_server.cli.bench.server import ServerProcess, free_ports


def step(speaking: int, p95: float | None, late_ticks: int = 0, failed: int = 0) -> Step:
    latency = {} if p95 is None else {"p50": p95 / 2, "p95": p95, "n": 3}
    return Step(speaking, speaking, 10.0, 50.0, 20.0, 900.0, 60, late_ticks, latency, failed)


def test_a_speaking_step_is_over_the_limit_once_a_tick_is_late_a_turn_fails_or_p95_doubles() -> None:
    alone = step(1, 500.0)
    assert not over_the_limit(alone, alone)
    assert not over_the_limit(step(3, 999.0), alone)
    assert over_the_limit(step(3, 1001.0), alone)
    assert over_the_limit(step(2, 600.0, late_ticks=1), alone)
    assert over_the_limit(step(2, 600.0, failed=1), alone)
    assert over_the_limit(step(2, None), alone)  # no turn finished at all


@pytest.fixture(scope="module")
def server_process() -> Iterator[ServerProcess]:
    with free_ports(1) as [port]:
        server = ServerProcess(argparse.Namespace(config=None, set=[]), ["server.offers_per_minute=0"], port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_a_short_climb_measures_idle_and_speaking_sessions_of_a_real_server(server_process: ServerProcess) -> None:
    plan = Plan(connected=(1, 2), speaking=(1,), measure_s=1.0, rounds=1)
    started = time.monotonic()
    summary = asyncio.run(climb(server_process, plan, say=True))
    connected, speaking = summary["connected_steps"], summary["speaking_steps"]
    assert [s["connected"] for s in connected] == [1, 2] or connected[-1]["late_ticks"]
    assert all(s["server_cpu_pct"] > 0 and s["rss_mb"] > 100 and s["threads"] > 1 for s in connected + speaking)
    assert summary["rss_per_connected_session_mb"] > 0
    (one,) = speaking
    assert one["first_audio_sent_ms"]["n"] == 1 and one["failed_turns"] == 0  # the said sentence was spoken
    assert summary["one_session_first_audio_sent_ms"] == one["first_audio_sent_ms"]
    assert time.monotonic() - started < 90

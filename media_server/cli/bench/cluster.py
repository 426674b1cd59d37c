"""``facecast bench cluster``: a cluster on loopback (a nats-server, two media nodes and two lip-sync
workers, all processes) against one node alone.

- **placement**: ``--clients`` pages connect to node A; how their sessions spread over the nodes.
- **turns**: each page asks typed questions; from sending one to hearing the reply's first sound,
  p50/p95, in the cluster (lip-sync on the workers) and on one node alone (lip-sync in process).
- **chunk round trip**: a 200 ms chunk of speech to a worker and its frames back through NATS, less the
  worker's own time on it (rendering and JPEG encoding): the cost of the hop itself.
- **recovery**: a worker killed mid-reply (that reply's longest playback gap; when the registry drops
  it), a node killed (until its page, reconnecting to the other node with its conversation, has its
  session), the broker killed mid-reply and restarted 2 s later (that reply's longest gap; until the
  registry is whole again and until a full node places a session on another again).

Figures for one run are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from engines.avatar import AvatarCatalogue
from engines.base import LipSyncEngine
from engines.registry import create_engine
from media_server.cli.bench.output import print_summary
from media_server.cli.bench.server import ServerProcess, free_ports
from media_server.cluster.lipsync import release_lease, render_chunk, request_lease
from media_server.config import Settings
from media_server.testing.cluster import (
    FacecastProcess,
    InProcessWorker,
    LoopThread,
    NatsServer,
    cluster_entries,
    remote_lipsync,
    until,
)
from media_server.testing.loopback_client import LoopbackClient
from media_server.testing.speech_corpus import QUESTIONS

CHUNK_S = 0.2
NODE_SETTINGS = ("server.offers_per_minute=0", "cluster.lipsync=remote", "cluster.heartbeat_s=0.5")
STORY = (
    "Welcome to the museum. The paintings are on the second floor, just up the stairs. "
    "The sculptures are in the garden, and the cafe is open until six in the evening."
)
BROKER_DOWN_S = 2.0


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 2), "p95": round(p95, 2), "n": len(ordered)}


def _is_state(state: str):  # type: ignore[no-untyped-def]
    return lambda event: event.get("type") == "state" and event.get("state") == state


async def _until_listening(client: LoopbackClient, sent: float) -> None:
    speaking = await client.wait_for(_is_state("speaking"), 90, after=sent)
    spoke_at = next(at for at, event in client.events if event is speaking)
    await client.wait_for(_is_state("listening"), 90, after=spoke_at)


def _longest_gap_ms(client: LoopbackClient, after: float) -> float:
    return max((e["longest_gap_ms"] for e in client.events_of("metrics", after) if "longest_gap_ms" in e), default=0.0)


async def _first_sound_after(client: LoopbackClient, sent: float) -> float:
    while (heard := client.recording.first_loud_audio_after(sent)) is None:
        await asyncio.sleep(0.02)
    return heard


async def _ask(client: LoopbackClient, questions: list[str]) -> list[float]:
    """Milliseconds from sending each question to hearing the first sound of its reply."""
    latencies = []
    for question in questions:
        sent = time.monotonic()
        client.send({"type": "text", "text": question})
        heard = await asyncio.wait_for(_first_sound_after(client, sent), 90)
        latencies.append((heard - sent) * 1000)
        await _until_listening(client, sent)
    return latencies


async def _turns(url: str, clients: int, questions: int) -> tuple[list[float], list[LoopbackClient]]:
    pages = [LoopbackClient(url, keep_video=False, audio_jitter_buffer_packets=1) for _ in range(clients)]
    for page in pages:
        await page.connect()
    asked = [QUESTIONS[(n * questions + q) % len(QUESTIONS)] for n in range(clients) for q in range(questions)]
    per_page = [asked[n * questions : (n + 1) * questions] for n in range(clients)]
    latencies = await asyncio.gather(*(_ask(page, mine) for page, mine in zip(pages, per_page, strict=True)))
    return [ms for page in latencies for ms in page], pages


async def _close(pages: list[LoopbackClient]) -> None:
    for page in pages:
        await page.close()


def _chunk_round_trips(settings: Settings, chunks: int) -> dict[str, object]:
    """A worker in this process on its own nats-server: 200 ms chunks through NATS, one at a time."""
    nats, loop = NatsServer(), LoopThread()
    nats.start()
    engine = create_engine("lipsync", "warp", {})
    assert isinstance(engine, LipSyncEngine)
    worker = InProcessWorker(nats, loop, engine, "bench-worker")
    node = remote_lipsync(nats.url, loop, engine)
    avatar = AvatarCatalogue(settings.server.avatars_dir).get(settings.server.default_avatar)
    fps, rate = settings.media.fps, settings.media.sample_rate
    audio = (0.2 * np.random.default_rng(1).standard_normal(int(CHUNK_S * rate))).astype(np.float32)
    round_trips, worker_times, payloads = [], [], []
    try:
        lease = loop.run(request_lease(node.link, avatar, fps, rate, 5.0))
        for _ in range(chunks):
            started = time.perf_counter()
            chunk = loop.run(render_chunk(node.link, lease, audio, False, 5.0))
            round_trips.append((time.perf_counter() - started) * 1000)
            worker_times.append(chunk.worker_ms)
            payloads.append(len(chunk.jpegs))
        loop.run(release_lease(node.link, lease))
    finally:
        loop.run(node.link.close())
        worker.stop()
        loop.close()
        nats.close()
    hop = [total - own for total, own in zip(round_trips, worker_times, strict=True)]
    return {
        "chunk_s": CHUNK_S,
        "round_trip_ms": _percentiles(round_trips),
        "worker_ms": _percentiles(worker_times),
        "hop_ms": _percentiles(hop),  # the round trip less the worker's own time
        "reply_kb": round(statistics.median(payloads) / 1024, 1),
        "request_kb": round(audio.nbytes / 1024, 1),
    }


async def _telling_the_story(node: FacecastProcess) -> tuple[LoopbackClient, float]:
    """A page on ``node`` whose avatar has started telling the long story; and when it was asked to."""
    page = LoopbackClient(node.url, keep_video=False)
    await page.connect()
    sent = time.monotonic()
    try:
        page.send({"type": "say", "text": STORY})
        await page.wait_for(_is_state("speaking"), 60, after=sent)
    except BaseException:
        await page.close()
        raise
    return page, sent


async def _worker_killed(cluster: dict[str, FacecastProcess]) -> dict[str, float]:
    a = cluster["A"]
    page, sent = await _telling_the_story(a)
    try:
        await asyncio.sleep(1.0)
        entries = cluster_entries(a)
        busy = next(name for name in ("W1", "W2") if entries[name]["sessions"] > 0)
        killed = time.monotonic()
        cluster[busy].kill()
        await until(lambda: busy not in cluster_entries(a), 30, "the registry kept the dead worker")
        dropped = time.monotonic() - killed
        await _until_listening(page, sent)
        return {"reply_longest_gap_ms": _longest_gap_ms(page, sent), "registry_dropped_it_s": round(dropped, 2)}
    finally:
        await page.close()


async def _node_killed(cluster: dict[str, FacecastProcess]) -> dict[str, float]:
    a, b = cluster["A"], cluster["B"]
    page = LoopbackClient(a.url, keep_video=False)
    await page.connect(conversation="bench-node-killed")
    await _ask(page, ["What is the capital of France?"])
    await page.close()
    killed = time.monotonic()
    a.kill()
    again = LoopbackClient(b.url, keep_video=False)
    try:
        await again.connect(conversation="bench-node-killed")
        session = await again.wait_for(lambda event: event.get("type") == "session", 20)
        reconnected = time.monotonic() - killed
    finally:
        await again.close()
    return {"page_reconnected_with_its_conversation_s": round(reconnected, 2), "messages_resumed": session.get("resumed", 0)}


async def _broker_killed(nats: NatsServer, cluster: dict[str, FacecastProcess]) -> dict[str, float]:
    a, b = cluster["A"], cluster["B"]
    page, sent = await _telling_the_story(a)
    try:
        await asyncio.sleep(0.5)
        nats.kill()
        await asyncio.sleep(BROKER_DOWN_S)
        nats.start()
        restarted, restarted_at = time.monotonic(), time.time()
        expected = {name for name, process in cluster.items() if process.alive()}

        def fresh() -> bool:  # every process has published again since the broker came back
            entries = cluster_entries(a)
            return expected <= set(entries) and all(entries[name]["at"] > restarted_at for name in expected)

        await until(fresh, 60, "the registry did not recover")
        registry_s = time.monotonic() - restarted
        placed = LoopbackClient(a.url, keep_video=False)
        await placed.connect()  # A has a session, B none: placement sends it to B
        placed_s = time.monotonic() - restarted
        on_b = b.get("/healthz")["sessions"]
        await placed.close()
        await _until_listening(page, sent)
        gap = _longest_gap_ms(page, sent)
    finally:
        await page.close()
    return {
        "reply_longest_gap_ms": gap,
        "registry_fresh_again_s": round(registry_s, 2),
        "placement_on_another_node_again_s": round(placed_s, 2),
        "sessions_on_B": on_b,
    }


async def _cluster_run(args: argparse.Namespace, clients: int, questions: int) -> dict[str, object]:
    nats = NatsServer()
    nats.start()
    settings = [*NODE_SETTINGS, *args.set]
    capacity = f"server.max_sessions={clients}"
    processes = {
        "A": FacecastProcess("serve", "A", nats, [*settings, capacity]),
        "B": FacecastProcess("serve", "B", nats, [*settings, capacity]),
        "W1": FacecastProcess("worker", "W1", nats, [*settings, f"cluster.worker_sessions={clients}"]),
        "W2": FacecastProcess("worker", "W2", nats, [*settings, f"cluster.worker_sessions={clients}"]),
    }
    try:
        for process in processes.values():
            process.wait_ready()
        await until(lambda: set(processes) <= set(cluster_entries(processes["A"])), 30, "the registry did not fill")
        latencies, pages = await _turns(processes["A"].url, clients, questions)  # type: ignore[arg-type]
        entries = cluster_entries(processes["A"])
        placement = {name: entry["sessions"] for name, entry in entries.items() if entry["role"] == "node"}
        frames = {name: entry["stats"] for name, entry in entries.items()}
        await _close(pages)
        await until(lambda: processes["A"].get("/healthz")["sessions"] == 0, 30, "sessions did not close")
        worker = await _worker_killed(processes)
        broker = await _broker_killed(nats, processes)
        node = await _node_killed(processes)
        return {
            "sessions_per_node": placement,
            "turn_first_sound_ms": _percentiles(latencies),
            "lipsync_stats": frames,  # a node's frames rendered on workers and here; a worker's leases and frames
            "worker_killed_mid_reply": worker,
            "broker_killed_mid_reply_back_after_2_s": broker,
            "node_killed": node,
        }
    finally:
        for process in processes.values():
            process.stop()
        nats.close()


async def _alone_run(args: argparse.Namespace, clients: int, questions: int) -> dict[str, object]:
    with free_ports(1) as (port,):
        pass
    server = ServerProcess(args, ["server.offers_per_minute=0", f"server.max_sessions={clients}"], port)
    try:
        server.wait_ready()
        latencies, pages = await _turns(server.url, clients, questions)
        await _close(pages)
        return {"turn_first_sound_ms": _percentiles(latencies)}
    finally:
        server.stop()


def main(args: argparse.Namespace, settings: Settings) -> None:
    clients, questions, chunks = (2, 2, 40) if args.quick else (args.clients, 4, 300)
    summary: dict[str, object] = {
        "setup": {"clients": clients, "questions_per_client": questions, "nodes": 2, "workers": 2, "quick": args.quick},
        "chunk_round_trip": _chunk_round_trips(settings, chunks),
    }
    summary["cluster"] = asyncio.run(_cluster_run(args, clients, questions))
    summary["one_node_alone"] = asyncio.run(_alone_run(args, clients, questions))
    print_summary(summary, args.json, sections=True)

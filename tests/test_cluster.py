"""A Facecast cluster of real processes on a real nats-server: two media nodes (A with one session slot,
B with two), lip-sync and render workers, and real aiortc clients.

The tests share one cluster and run in order, each leaving it as the next expects: placement and the
session APIs; a live turn on a worker, the worker killed mid-reply; render jobs, their worker killed;
the broker stopped and restarted while a session talks; and last, node A killed while its page's
conversation goes on at B.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from engines import PROJECT_ROOT
from media_server.cluster import jobs
from media_server.cluster.conversations import ConversationStore
from media_server.cluster.link import ClusterLink
from media_server.config import ClusterSettings
from media_server.testing.cluster import FacecastProcess, NatsServer, cluster_entries, until, wait_until
from media_server.testing.loopback_client import LoopbackClient
from media_server.testing.speech_corpus import write_wav

pytestmark = pytest.mark.timeout(240)

COMMON = (
    "server.offers_per_minute=0",
    "llm.max_tokens=24",
    "cluster.heartbeat_s=0.3",
    "cluster.registry_ttl_s=1.5",
    "cluster.lipsync=remote",
    "cluster.lipsync_chunk_deadline_s=0.5",
    "cluster.job_ack_wait_s=2",
    "cluster.job_attempts=2",
    f"api.outputs_dir={tempfile.mkdtemp(prefix='facecast-cluster-outputs-')}",
)
# The longest a reply may wait for its next frame while a worker or the broker is lost. Waiting on them
# would last a chunk's deadline (lipsync_chunk_deadline_s, 0.5 s here) or for ever; what is left is the
# playback jitter a single loaded node has too (TTS and the encoders share two cores with the test).
AUDIO_NEVER_WAITED_MS = 300
# Spoken word for word (no LLM): long enough to kill something while it plays.
LONG_SAY = (
    "Welcome to the museum. The paintings are on the second floor, just up the stairs. "
    "The sculptures are in the garden, and the cafe is open until six in the evening."
)


@dataclass
class Cluster:
    nats: NatsServer
    a: FacecastProcess
    b: FacecastProcess
    workers: dict[str, FacecastProcess] = field(default_factory=dict)

    async def start_worker(self, name: str) -> FacecastProcess:
        """A new worker, waited for without stopping the event loop (the tests' clients live on it)."""
        worker = FacecastProcess("worker", name, self.nats, COMMON)
        self.workers[name] = worker
        await asyncio.to_thread(worker.wait_ready)
        await until(lambda: name in cluster_entries(self.a), 10, f"{name} did not join the registry")
        return worker


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    nats = NatsServer()
    nats.start()
    a = FacecastProcess("serve", "A", nats, (*COMMON, "server.max_sessions=1"))
    b = FacecastProcess("serve", "B", nats, (*COMMON, "server.max_sessions=2"))
    w1 = FacecastProcess("worker", "W1", nats, COMMON)
    running = Cluster(nats, a, b, {"W1": w1})
    try:
        for process in (w1, a, b):
            process.wait_ready()
        wait_until(lambda: {"A", "B", "W1"} <= set(cluster_entries(a)), 10, "the registry did not fill")
        yield running
    finally:
        for process in (a, b, *running.workers.values()):
            process.stop()
        nats.close()


async def http_json(method: str, url: str, **kwargs: object) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, dict(response.headers), await response.json(content_type=None)


def is_state(state: str):  # type: ignore[no-untyped-def]
    return lambda event: event.get("type") == "state" and event.get("state") == state


async def until_listening_again(client: LoopbackClient, sent: float, timeout_s: float = 90) -> None:
    """Until the avatar, having started to speak after ``sent``, is listening again."""
    speaking = await client.wait_for(is_state("speaking"), timeout_s, after=sent)
    spoke_at = next(at for at, event in client.events if event is speaking)
    await client.wait_for(is_state("listening"), timeout_s, after=spoke_at)


async def speak_and_wait(client: LoopbackClient, event: dict, timeout_s: float = 90) -> float:
    """Send ``event`` and wait until the avatar has finished answering it; when it was sent."""
    sent = time.monotonic()
    client.send(event)
    await until_listening_again(client, sent, timeout_s)
    return sent


async def heard_speech_after(client: LoopbackClient, after: float, timeout_s: float = 10) -> bool:
    """Whether the client received loud audio sent after ``after`` (its media readers may lag its events)."""
    deadline = time.monotonic() + timeout_s
    while client.recording.first_loud_audio_after(after) is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def longest_gap_ms(client: LoopbackClient, after: float) -> float:
    return max(e["longest_gap_ms"] for e in client.events_of("metrics", after) if "longest_gap_ms" in e)


def errors_since(client: LoopbackClient, after: float) -> list[dict]:
    return client.events_of("error", after)


async def offer_status(base_url: str) -> tuple[int, dict[str, str]]:
    """POST /offer with a real offer, without connecting: the status and headers."""
    client = LoopbackClient(base_url)
    client._prepare_offer()
    await client.pc.setLocalDescription(await client.pc.createOffer())
    body = {"sdp": client.pc.localDescription.sdp, "type": "offer"}
    try:
        status, headers, _ = await http_json("POST", f"{base_url}/offer", json=body)
    finally:
        await client.pc.close()
    return status, headers


async def test_a_full_node_places_the_session_on_another_whose_answer_reaches_the_client(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    first, second = LoopbackClient(a.url), LoopbackClient(a.url)
    try:
        await first.connect()
        assert a.get("/healthz")["sessions"] == 1  # A was as good as any: it kept the first
        await second.connect()  # A is full: B answers, with its own ICE candidates
        assert b.get("/healthz")["sessions"] == 1 and a.get("/healthz")["sessions"] == 1
        sent = await speak_and_wait(second, {"type": "text", "text": "What is the capital of France?"})
        reply = second.events_of("reply", sent)[-1]
        assert reply["final"] and "Paris" in reply["text"]
        assert await heard_speech_after(second, sent)
        assert second.recording.video and second.recording.video[-1].size == (512, 512)

        # The broadcast API and WHEP through A reach the broadcast on B.
        status, headers, described = await http_json("POST", f"{a.url}/api/sessions", json={"id": "lobby"})
        assert status == 201 and headers["Location"] == "/api/sessions/lobby", described
        assert b.get("/healthz")["broadcasts"] == 1
        status, _, said = await http_json("POST", f"{a.url}/api/sessions/lobby/say", json={"text": "Welcome."})
        assert (status, said) == (202, {"session_id": "lobby", "speaking": True})
        viewer = LoopbackClient(a.url)
        await viewer.watch("lobby")
        assert viewer.whep_resource is not None and viewer.whep_resource.startswith("/whep/lobby/")
        status, _, _ = await http_json("DELETE", a.url + viewer.whep_resource)
        assert status == 200
        await viewer.close()

        # Every node full: 503 with Retry-After.
        status, headers = await offer_status(a.url)
        assert status == 503 and int(headers["Retry-After"]) > 0

        for path in ("/api/sessions/lobby", f"/sessions/{second.session_id}"):
            status, _, closed = await http_json("DELETE", a.url + path)
            assert status == 200, closed
        health = b.get("/healthz")
        assert (health["sessions"], health["broadcasts"]) == (0, 0)
        status, _, missing = await http_json("DELETE", f"{a.url}/sessions/{second.session_id}")
        assert status == 404 and missing["error"]["code"] == "no_session"
    finally:
        for client in (first, second):
            await client.close()
    await until(lambda: a.get("/healthz")["sessions"] == 0, 20, "A's session did not close")


async def test_a_worker_renders_a_live_turn_and_its_death_mid_reply_leaves_no_gap(cluster: Cluster) -> None:
    a = cluster.a
    client = LoopbackClient(a.url)
    await client.connect()
    try:
        sent = time.monotonic()
        client.send({"type": "say", "text": LONG_SAY})
        await client.wait_for(is_state("speaking"), 60, after=sent)
        await asyncio.sleep(1.0)
        assert cluster_entries(a)["W1"]["stats"]["frames"] > 0  # the worker renders the turn
        local_before = cluster_entries(a)["A"]["stats"]["frames_local"]
        cluster.workers["W1"].kill()
        await until_listening_again(client, sent)
        assert errors_since(client, sent) == []
        assert longest_gap_ms(client, sent) < AUDIO_NEVER_WAITED_MS
        assert cluster_entries(a)["A"]["stats"]["frames_local"] > local_before  # the rest was rendered on A

        w2 = await cluster.start_worker("W2")
        remote_before = cluster_entries(a)["A"]["stats"]["frames_remote"]
        sent = await speak_and_wait(client, {"type": "say", "text": "Thank you for visiting."})
        assert longest_gap_ms(client, sent) < AUDIO_NEVER_WAITED_MS and errors_since(client, sent) == []
        entries = cluster_entries(a)
        assert entries["W2"]["stats"]["frames"] > 0 and entries["A"]["stats"]["frames_remote"] > remote_before
        assert w2.alive()
    finally:
        await client.close()
    await until(lambda: a.get("/healthz")["sessions"] == 0, 20, "A's session did not close")


async def test_a_render_job_outlives_its_worker_and_a_failing_job_ends_failed_with_its_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.start_worker("W3")
    seconds = 20.0
    rate = 16000
    t = np.arange(int(seconds * rate)) / rate
    speech = (0.3 * np.sin(2 * np.pi * 180 * t) * np.abs(np.sin(2 * np.pi * 2.5 * t))).astype(np.float32)
    audio = write_wav(tmp_path / "long.wav", speech, rate).read_bytes()
    link = ClusterLink(ClusterSettings(url=cluster.nats.url, node_id="test-client"), role="tool")
    await link.start()
    assert await link.wait_connected(10)
    try:
        job_id = await jobs.submit_render(link, audio, "default")
        deadline = time.monotonic() + 60
        while (status := await jobs.job_status(link, job_id)) is None or status.state != "running":
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
        first_worker = status.worker
        assert first_worker is not None
        cluster.workers[first_worker].kill()  # mid-job
        finished = await jobs.wait_for_job(link, job_id, 120)
        assert finished.state == "done" and finished.attempts == 2 and finished.worker != first_worker
        assert finished.frames == seconds * 25

        failing = await jobs.submit_render(link, b"this is not audio", "default")
        failed = await jobs.wait_for_job(link, failing, 60)
    finally:
        await link.close()
    assert failed.state == "failed" and failed.attempts == 2
    assert "could not be read as audio" in (failed.error or "")

    # Any node serves a job's status and its MP4.
    status_code, _, described = await http_json("GET", f"{cluster.b.url}/api/jobs/{job_id}")
    assert status_code == 200 and described["state"] == "done" and described["video_url"].endswith("video.mp4")
    async with aiohttp.ClientSession() as http, http.get(cluster.b.url + described["video_url"]) as response:
        assert response.status == 200 and response.content_type == "video/mp4"
        video = await response.read()
    with av.open(io.BytesIO(video)) as container:
        assert container.streams.audio and sum(1 for _ in container.decode(video=0)) == seconds * 25
    status_code, _, described = await http_json("GET", f"{cluster.a.url}/api/jobs/{failing}")
    assert status_code == 200 and described["state"] == "failed" and "could not be read" in described["error"]

    # `facecast render --cluster`: the same, from the command line.
    short = write_wav(tmp_path / "short.wav", speech[: 2 * rate], rate)
    out = tmp_path / "rendered.mp4"
    render = [sys.executable, "-m", "media_server", "render", "--cluster", cluster.nats.url]
    render += ["--avatar", "default", "--audio", str(short), "--out", str(out)]
    rendered = await asyncio.to_thread(subprocess.run, render, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0 and "50 frames" in rendered.stdout, rendered.stderr
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 50


async def test_the_model_apis_render_as_jobs_of_the_workers(cluster: Cluster, tmp_path: Path) -> None:
    rate = 16000
    t = np.arange(2 * rate) / rate
    speech = (0.3 * np.sin(2 * np.pi * 180 * t) * np.abs(np.sin(2 * np.pi * 2.5 * t))).astype(np.float32)
    wav = write_wav(tmp_path / "speech.wav", speech, rate).read_bytes()
    body = {"byte_str": base64.b64encode(wav).decode()}
    status_code, _, answer = await http_json("POST", f"{cluster.a.url}/v1/animation", json=body)
    assert status_code == 200 and answer["video_path"].endswith(".mp4")
    with av.open(answer["video_path"]) as container:
        assert container.streams.audio and sum(1 for _ in container.decode(video=0)) == 50
    job_id = Path(answer["video_path"]).stem.rsplit("-", 1)[1]  # the MP4 is named after its render job
    status_code, _, described = await http_json("GET", f"{cluster.b.url}/api/jobs/{job_id}")
    assert status_code == 200 and described["state"] == "done" and described["worker"] in cluster.workers


async def test_an_avatar_added_on_one_machine_is_fetched_by_a_node_that_lacks_it(cluster: Cluster, tmp_path: Path) -> None:
    elsewhere = tmp_path / "avatars"
    add = [
        sys.executable, "-m", "media_server", "--set", f"server.avatars_dir={elsewhere}",
        "avatars", "add", "ada", str(PROJECT_ROOT / "avatars" / "default" / "portrait.jpg"), "--cluster", cluster.nats.url,
    ]  # fmt: skip
    added = subprocess.run(add, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0 and "shared avatar 'ada'" in added.stdout, added.stderr
    b = cluster.b
    assert not (b.avatars / "ada").exists()
    options = b.get("/api/options")
    assert "ada" not in options["avatars"]  # no process has it yet: it is only in the object store
    client = LoopbackClient(b.url)
    try:
        await client.connect(avatar="ada")
        session = await client.wait_for(lambda event: event.get("type") == "session", 10)
        assert session["avatar"] == "ada" and (b.avatars / "ada" / "avatar.toml").exists()
        sent = await speak_and_wait(client, {"type": "say", "text": "Hello, I am Ada."})
        assert await heard_speech_after(client, sent) and errors_since(client, sent) == []
    finally:
        await client.close()
    await until(lambda: "ada" in b.get("/api/options")["avatars"], 5, "B does not offer the avatar it fetched")


async def test_the_broker_going_down_mid_reply_goes_unnoticed_and_the_cluster_recovers(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    client = LoopbackClient(a.url)
    await client.connect()
    placed = LoopbackClient(a.url)
    try:
        sent = time.monotonic()
        client.send({"type": "say", "text": LONG_SAY})
        await client.wait_for(is_state("speaking"), 60, after=sent)
        await asyncio.sleep(0.5)
        cluster.nats.kill()
        await until_listening_again(client, sent)
        assert errors_since(client, sent) == [] and longest_gap_ms(client, sent) < AUDIO_NEVER_WAITED_MS
        assert a.get("/api/cluster")["connected"] is False
        sent = await speak_and_wait(client, {"type": "text", "text": "What is the capital of Italy?"})
        assert errors_since(client, sent) == [] and client.events_of("reply", sent)[-1]["final"]

        cluster.nats.start()  # same port, same storage
        await until(
            lambda: a.get("/api/cluster")["connected"] and {"A", "B"} <= set(cluster_entries(a)),
            30,
            "A did not reconnect and hear B again",
        )
        await placed.connect()  # A is full: placement works again
        assert b.get("/healthz")["sessions"] == 1
    finally:
        for each in (client, placed):
            await each.close()
    await until(lambda: a.get("/healthz")["sessions"] == 0 and b.get("/healthz")["sessions"] == 0, 20, "sessions left")


async def test_a_page_reconnecting_after_its_node_died_resumes_its_conversation_on_another(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    conversation = "resume-after-a-died"
    client = LoopbackClient(a.url)
    await client.connect(conversation=conversation)
    try:
        assert a.get("/healthz")["sessions"] == 1
        await speak_and_wait(client, {"type": "text", "text": "My name is Ada."})
    finally:
        await client.close()
    link = ClusterLink(ClusterSettings(url=cluster.nats.url, node_id="test-reader"), role="tool")
    await link.start()
    assert await link.wait_connected(10)
    store = ConversationStore(link, max_messages=200)
    try:
        a.kill()
        await until(lambda: "A" not in cluster_entries(b), 10, "B still counts on A")
        again = LoopbackClient(b.url)
        await again.connect(conversation=conversation)
        try:
            session = await again.wait_for(lambda event: event.get("type") == "session", 10)
            assert session["conversation"] == conversation and session["resumed"] == 2
            await speak_and_wait(again, {"type": "text", "text": "What is my name?"})
        finally:
            await again.close()
        history = await store.load(conversation)
    finally:
        await link.close()
    assert [m.role for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0].text == "My name is Ada." and history[2].text == "What is my name?"

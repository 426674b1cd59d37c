"""The cluster's pure parts: placement, registry entries, conversation bounds, credentials, names."""

from __future__ import annotations

import json

from engines.base import ChatMessage
from media_server.cluster.conversations import MAX_BYTES, decode_history, encode_history
from media_server.cluster.link import ClusterLink, connect_options, redacted
from media_server.cluster.placement import choose_node
from media_server.cluster.registry import NodeInfo
from media_server.config import ClusterSettings


def node(node_id: str, sessions: int, capacity: int = 4, cpu: float = 0.0) -> NodeInfo:
    return NodeInfo(node_id, "node", f"http://{node_id}", sessions, capacity, ["default"], {}, cpu_load=cpu)


def test_a_session_goes_to_the_least_loaded_node_with_room() -> None:
    here = node("a", 3)
    assert choose_node(here, [here, node("b", 1), node("c", 2)]).id == "b"


def test_this_node_takes_it_when_as_good_as_any() -> None:
    here = node("a", 1)
    assert choose_node(here, [node("b", 1), node("c", 1, cpu=0.0)]).id == "a"


def test_load_is_relative_to_capacity_and_full_nodes_have_no_room() -> None:
    here = node("a", 1, capacity=1)
    assert choose_node(here, [node("b", 3, capacity=8), node("c", 1, capacity=2)]).id == "b"
    assert choose_node(here, [node("b", 8, capacity=8)]) is None


def test_a_registry_entry_survives_the_wire() -> None:
    entry = NodeInfo("gpu-1", "worker", None, 1, 2, ["default"], {"lipsync": "wav2lip"}, {"frames": 5}, 0.5, 12.0)
    assert NodeInfo.from_json(entry.to_json()) == entry
    assert json.loads(entry.to_json())["load"] == 0.5


def test_a_stored_conversation_keeps_the_newest_messages_within_its_bounds() -> None:
    history = [ChatMessage("user" if n % 2 == 0 else "assistant", f"message {n}") for n in range(10)]
    assert decode_history(encode_history(history, 4)) == history[-4:]
    long = [ChatMessage("user", "x" * 10_000) for _ in range(20)]
    kept = decode_history(encode_history(long, 200))
    assert 0 < len(kept) < 20 and len(encode_history(long, 200)) <= MAX_BYTES


def test_credentials_come_from_the_config_or_the_environment_and_stay_out_of_logs() -> None:
    settings = ClusterSettings(url="nats://127.0.0.1:4222")
    environ = {"NATS_TOKEN": "s3cret", "NATS_USER": "u", "NATS_PASSWORD": "p"}
    assert connect_options(settings, environ) == {"token": "s3cret", "user": "u", "password": "p"}
    assert connect_options(ClusterSettings(url="nats://h:1", token="mine"), environ)["token"] == "mine"
    assert redacted("nats://user:pass@nats.example.org:4222") == "nats://nats.example.org:4222"


def test_two_clusters_on_one_broker_never_share_a_subject_or_bucket() -> None:
    school = ClusterLink(ClusterSettings(url="nats://h:1", name="school", node_id="a"), "node")
    kiosks = ClusterLink(ClusterSettings(url="nats://h:1", name="kiosks", node_id="a"), "node")
    assert school.subject("session", "x") != kiosks.subject("session", "x")
    assert school.bucket_name("registry") != kiosks.bucket_name("registry")

"""Which node takes a new session: the least-loaded node with room, this one when it is as good as any."""

from __future__ import annotations

from media_server.cluster.registry import NodeInfo


def choose_node(here: NodeInfo, others: list[NodeInfo]) -> NodeInfo | None:
    """The node a new session goes to, or None when every node is full. Ties go to ``here`` (no forwarding
    hop), then to the node with the lower machine load."""
    candidates = [node for node in [here, *others] if node.has_room and (node is here or node.id != here.id)]
    if not candidates:
        return None
    return min(candidates, key=lambda node: (node.load, node is not here, node.cpu_load, node.id))

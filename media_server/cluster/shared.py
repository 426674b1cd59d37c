"""What the HTTP layer uses of the cluster, importable without NATS: its errors (mapped to statuses) and
the headers of a forwarded request."""

from __future__ import annotations


class ClusterUnavailable(RuntimeError):
    """The broker cannot be reached now; the caller does the work locally or says so."""


class ForwardTimeout(Exception):
    """The node that should serve a forwarded request did not answer in time."""


class AllNodesFull(Exception):
    """No node of the cluster has room for another session."""


TRUST_HEADER = "X-Facecast-Forwarded"  # the serving process's own secret: the entry node checked the client
CLIENT_HEADER = "X-Facecast-Client"  # the client's address, as the entry node saw it
PLACED_HEADER = "X-Facecast-Placed"  # an offer already placed: open it here

"""How many new sessions and viewers one client address may open a minute, so that one client cannot
hold every slot by opening connections it never completes."""

from __future__ import annotations

import ipaddress
import time
from collections import deque

from aiohttp import web

WINDOW_S = 60.0
FORWARDED_CLIENT = "forwarded_client"  # the request's key for the client of a request another node forwarded


def client_address(request: web.Request) -> str:
    """The client's address; behind a proxy on this machine, the address the proxy says it forwards; for a
    request another node of the cluster forwarded, the client that node saw."""
    if forwarded := request.get(FORWARDED_CLIENT):
        return str(forwarded)
    remote = request.remote or "unknown"
    forwarded = request.headers.get("X-Forwarded-For")
    try:
        local_proxy = ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        local_proxy = False
    if forwarded and local_proxy:
        return forwarded.split(",")[0].strip()[:64] or remote
    return remote


class OfferLimiter:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._offers: dict[str, deque[float]] = {}

    def retry_after(self, address: str) -> int | None:
        """Count an offer from ``address``: None if it is within the limit, else the seconds until it is."""
        if self.per_minute == 0:
            return None
        now = time.monotonic()
        self._forget_before(now - WINDOW_S)
        offers = self._offers.setdefault(address, deque())
        if len(offers) >= self.per_minute:
            return max(1, int(offers[0] + WINDOW_S - now) + 1)
        offers.append(now)
        return None

    def _forget_before(self, cutoff: float) -> None:
        for address in [a for a, offers in self._offers.items() if offers and offers[-1] < cutoff]:
            del self._offers[address]
        for offers in self._offers.values():
            while offers and offers[0] < cutoff:
                offers.popleft()

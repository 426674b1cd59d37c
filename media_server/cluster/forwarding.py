"""HTTP requests carried over NATS request-reply to the node that must serve them.

A node that receives an offer it places elsewhere, or a session API call for a session another node
owns, sends the request (method, path, the headers that matter, body) to that node's subject and
returns its reply unchanged. The owning node serves it through its own HTTP application, on
loopback, so a forwarded request meets exactly the handlers, checks and errors of a direct one; it
carries a secret only that process knows, which tells its access layer that the node the client
reached has already checked the client (and who the client is, for the per-client offer limit).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import aiohttp
from aiohttp import web
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from media_server.cluster.link import ClusterLink
from media_server.cluster.shared import CLIENT_HEADER, PLACED_HEADER, TRUST_HEADER, ForwardTimeout

log = logging.getLogger(__name__)
FORWARDED_HEADERS = ("Content-Type", "Authorization")
REPLY_HEADERS = ("Content-Type", "Location", "Retry-After", "Link", "WWW-Authenticate")
STATUS = "Facecast-Status"  # not "Status": NATS uses that for its own (e.g. no responders)


async def forward(
    link: ClusterLink, subject: str, request: web.Request, client: str, timeout_s: float
) -> web.Response | None:
    """The reply of whoever serves ``subject``, or None when nobody does (no such session, node gone)."""
    headers = {"Method": request.method, "Path": request.path_qs, "Client": client}
    headers.update({name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers})
    try:
        reply = await link.client().request(subject, await request.read(), timeout=timeout_s, headers=headers)
    except NoRespondersError:
        return None
    except NatsTimeout:
        raise ForwardTimeout(f"no answer within {timeout_s:g} s") from None
    answer = reply.headers or {}
    status = int(answer.get(STATUS, "502"))
    return web.Response(
        status=status, body=reply.data, headers={name: answer[name] for name in REPLY_HEADERS if name in answer}
    )


class Replayer:
    """Serves requests forwarded to this node through its own HTTP application."""

    def __init__(self, link: ClusterLink, base_url: str) -> None:
        self.link = link
        self.base_url = base_url
        self.secret = secrets.token_hex(16)
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def trusts(self, request: web.Request) -> bool:
        return secrets.compare_digest(request.headers.get(TRUST_HEADER, ""), self.secret)

    async def on_placed(self, message: Msg) -> None:
        self._spawn(message, placed=True)

    async def on_session(self, message: Msg) -> None:
        self._spawn(message, placed=False)

    def _spawn(self, message: Msg, placed: bool) -> None:
        # Subscription callbacks run one at a time: a slow chat reply must not hold up the next offer.
        task = asyncio.create_task(self._serve(message, placed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, message: Msg, placed: bool) -> None:
        asked = message.headers or {}
        headers = {name: asked[name] for name in FORWARDED_HEADERS if name in asked}
        headers[TRUST_HEADER] = self.secret
        headers[CLIENT_HEADER] = asked.get("Client", "")
        if placed:
            headers[PLACED_HEADER] = "1"
        if self._http is None:
            self._http = aiohttp.ClientSession()
        try:
            async with self._http.request(
                asked.get("Method", "GET"), self.base_url + asked.get("Path", "/"), data=message.data,
                headers=headers, ssl=False,
            ) as response:
                body = await response.read()
                reply = {name: response.headers[name] for name in REPLY_HEADERS if name in response.headers}
                reply[STATUS] = str(response.status)
        except aiohttp.ClientError as error:
            log.warning("cluster: could not serve a forwarded request: %s", error)
            body, reply = b'{"error": {"code": "internal", "message": "the node could not serve it"}}', {STATUS: "502"}
        if message.reply and self.link.connected:
            await self.link.client().publish(message.reply, body, headers=reply)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._http is not None:
            await self._http.close()

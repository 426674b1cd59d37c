"""Who may use what. Every route declares its access in the route table (http/app.py):

- ``PAGE``: pages, their files and health checks; anyone who reaches the server.
- ``CLIENT``: what the pages call (offers, options, WHEP); pages of other web sites may call it only
  when ``server.allowed_origins`` lists their origin (CORS; a refusal still carries CORS headers, so the
  page can read and show why). Requests without an ``Origin`` (programs, not browsers) are not subject to it.
- ``CONTROL``: the APIs that drive the avatar (broadcast sessions, and the model APIs): as ``CLIENT``,
  and also ``Authorization: Bearer <server.api_token>``; with no token configured, only clients on this
  machine (loopback, not through a proxy).

A request another node of the cluster forwarded (http/cluster.py) was checked by that node: it is served
as it is, from the client the forwarding node names.

And for every request: the ``Host`` must be a name this server is known by (an IP address, localhost,
this machine's name, ``server.host``, ``server.allowed_hosts``). Otherwise a web page on any site could
reach a local server through a DNS name it controls that resolves to 127.0.0.1 (DNS rebinding), and
its requests would look same-origin.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from enum import Enum
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import AbstractRoute

from media_server.cluster.shared import CLIENT_HEADER
from media_server.config import ServerSettings
from media_server.http.errors import ApiError, Handler, bad_request
from media_server.http.limits import FORWARDED_CLIENT

PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
PREFLIGHT_MAX_AGE_S = 600
LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class Access(Enum):
    PAGE = "page"
    CLIENT = "client"
    CONTROL = "control"


def is_loopback_client(request: web.Request) -> bool:
    """A client on this machine, talking to the server directly (a proxy's requests carry forwarding headers)."""
    if any(header in request.headers for header in PROXY_HEADERS) or request.remote is None:
        return False
    try:
        return ipaddress.ip_address(request.remote.split("%")[0]).is_loopback
    except ValueError:  # a Unix socket's peer, say
        return False


def known_host_names(settings: ServerSettings) -> frozenset[str]:
    hostname = socket.gethostname().lower()
    names = {*LOCAL_NAMES, hostname, f"{hostname}.local", settings.host.lower(), *settings.allowed_hosts}
    return frozenset(name.lower().rstrip(".") for name in names)


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port; ValueError when it is not one."""
    parsed = urlsplit(f"//{host_header}")
    name = parsed.hostname
    parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
    if not name:
        raise ValueError(host_header)
    return name.rstrip(".")


def host_refusal(request: web.Request, known: frozenset[str]) -> ApiError | None:
    header = request.headers.get(hdrs.HOST)
    if header is None:
        return None  # HTTP/1.0 without a Host: no name to rebind
    try:
        name = _host_name(header)
    except ValueError:
        return bad_request(f"the Host header {header[:80]!r} is not a host name", "bad_header")
    try:
        ipaddress.ip_address(name)
        return None  # an address, not a name: a rebinding page cannot send it
    except ValueError:
        pass
    if name in known:
        return None
    return ApiError(
        403,
        "host_not_allowed",
        f"this server does not answer to the name {name!r}; if that is how it is reached (e.g. through a "
        "reverse proxy), add it to server.allowed_hosts",
    )


def cross_origin(request: web.Request) -> str | None:
    """The request's Origin when it is another site's (same host and port counts as ours, whatever the scheme:
    behind a TLS proxy the browser says https and the server sees http). 400 for one that is not an origin."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None or origin == "null":
        return origin
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        raise bad_request(f"the Origin header {origin[:80]!r} is not an origin", "bad_header") from None
    return None if netloc == request.host else origin


def origin_allowed(origin: str, settings: ServerSettings) -> bool:
    return "*" in settings.allowed_origins or origin.rstrip("/") in settings.allowed_origins


def _cors_headers(origin: str) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": "Location, Retry-After, Link",
        "Vary": "Origin",
    }


def _preflight(origin: str, request: web.Request) -> web.Response:
    requested = request.headers.get("Access-Control-Request-Headers", "")
    headers = {
        **_cors_headers(origin),
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": requested or "Content-Type, Authorization",
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
    }
    return web.Response(status=204, headers=headers)


def control_refusal(request: web.Request, settings: ServerSettings) -> ApiError | None:
    """Why this request may not use the control APIs, or None when it may."""
    token = settings.api_token
    if token is None:
        if is_loopback_client(request):
            return None
        return ApiError(
            403,
            "api_token_required",
            "this API answers only this machine until server.api_token is set; "
            "set it and send it as 'Authorization: Bearer <token>'",
        )
    scheme, _, presented = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="facecast"'}
    if scheme.lower() != "bearer" or not presented.strip():
        return ApiError(401, "unauthorized", "missing 'Authorization: Bearer <token>' header", challenge)
    if not presented.strip().isascii():
        return bad_request("the Authorization header holds characters a token never has", "bad_header")
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return ApiError(401, "unauthorized", "wrong API token", challenge)
    return None


def access_middleware(
    settings: ServerSettings,
    access_of: Callable[[AbstractRoute], Access],
    forwarded: Callable[[web.Request], bool] = lambda request: False,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    known = known_host_names(settings)

    @web.middleware
    async def control_access(request: web.Request, handler: Handler) -> web.StreamResponse:
        if forwarded(request):
            request[FORWARDED_CLIENT] = request.headers.get(CLIENT_HEADER, "")
            return await handler(request)
        if (refusal := host_refusal(request, known)) is not None:
            raise refusal
        origin = cross_origin(request)
        if origin is not None and request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            # Answered even for origins that are not allowed, so that the real request's refusal can be read.
            return _preflight(origin, request)
        access = access_of(request.match_info.route)
        allowed = origin is not None and origin_allowed(origin, settings)
        cors = _cors_headers(origin) if allowed and origin is not None else {}
        if origin is not None and access is not Access.PAGE and not allowed:
            message = (
                f"pages from {origin} may not use this Facecast server: its owner must add that origin "
                "to server.allowed_origins"
            )
            raise ApiError(403, "origin_not_allowed", message, _cors_headers(origin))
        if access is Access.CONTROL and (refusal := control_refusal(request, settings)) is not None:
            raise ApiError(refusal.status, refusal.code, refusal.message, {**refusal.headers, **cors})
        response = await handler(request)  # errors are responses by now (errors_as_json runs inside too)
        response.headers.update(cors)
        return response

    return control_access

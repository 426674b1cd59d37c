"""Who may use the server: the broadcast API's token, and which other web sites' pages may call it (CORS).

- ``/api/sessions…`` (the broadcast API) needs ``Authorization: Bearer <server.api_token>``; with no
  token configured it answers only clients on this machine (loopback, not through a proxy).
- A page from another origin may call the API endpoints only when ``server.allowed_origins`` lists
  its origin (or ``"*"``). A refusal still carries CORS headers, so the page can read and show why.
  Requests without an ``Origin`` header (programs, not browsers) are not subject to CORS.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from media_server.config import ServerSettings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BROADCAST_API_PREFIX = "/api/sessions"
# Endpoints a page from another origin uses; everything else (pages, static files) is only shared with allowed origins.
CROSS_ORIGIN_API_PREFIXES = ("/offer", "/api/", "/sessions/", "/whep")
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
PREFLIGHT_MAX_AGE_S = 600


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def is_loopback_client(request: web.Request) -> bool:
    """A client on this machine, talking to the server directly (a proxy's requests carry forwarding headers)."""
    if any(header in request.headers for header in PROXY_HEADERS) or request.remote is None:
        return False
    try:
        return ipaddress.ip_address(request.remote.split("%")[0]).is_loopback
    except ValueError:  # a Unix socket's peer, say
        return False


def api_refusal(request: web.Request, settings: ServerSettings) -> web.Response | None:
    """Why this request may not use the broadcast API, or None when it may."""
    token = settings.api_token
    if token is None:
        if is_loopback_client(request):
            return None
        return json_error(
            403,
            "api_token_required",
            "the broadcast API answers only this machine until server.api_token is set; "
            "set it and send it as 'Authorization: Bearer <token>'",
        )
    scheme, _, presented = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="facecast"'}
    if scheme.lower() != "bearer" or not presented.strip():
        return json_error(401, "unauthorized", "missing 'Authorization: Bearer <token>' header", challenge)
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return json_error(401, "unauthorized", "wrong API token", challenge)
    return None


def cross_origin(request: web.Request) -> str | None:
    """The request's Origin when it is another site's (same host and port counts as ours, whatever the scheme:
    behind a TLS proxy the browser says https and the server sees http)."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None or urlsplit(origin).netloc == request.host:
        return None
    return origin


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


def access_middleware(settings: ServerSettings) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def control_access(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = cross_origin(request)
        api = request.path.startswith(CROSS_ORIGIN_API_PREFIXES)
        if origin is not None and request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            # Answered even for origins that are not allowed, so that the real request's refusal can be read.
            return _preflight(origin, request)
        if origin is not None and api and not origin_allowed(origin, settings):
            return json_error(
                403,
                "origin_not_allowed",
                f"pages from {origin} may not use this Facecast server: its owner must add that origin "
                "to server.allowed_origins",
                _cors_headers(origin),
            )
        if request.path.startswith(BROADCAST_API_PREFIX) and (refusal := api_refusal(request, settings)) is not None:
            response: web.StreamResponse = refusal
        else:
            response = await handler(request)
        if origin is not None and origin_allowed(origin, settings):
            response.headers.update(_cors_headers(origin))
        return response

    return control_access

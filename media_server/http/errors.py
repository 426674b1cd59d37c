"""Every HTTP failure is a JSON body with a status and a code; request validation is written once, here.

Handlers raise ``ApiError`` (or aiohttp's HTTP exceptions) and never build an error response by hand;
nothing a client sends reaches it as a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from media_server.service.errors import (
    BadInput,
    Busy,
    EngineFailed,
    EngineTimedOut,
    NotFound,
    ServiceError,
    UnusableAvatar,
)
from media_server.sessions.messages import BadMessage, json_object

log = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RETRY_AFTER_S = 10


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> web.Response:
        return json_error(self.status, self.code, self.message, self.headers)


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def busy(code: str, message: str) -> ApiError:
    """503 with the seconds to wait in Retry-After."""
    return ApiError(503, code, message, {"Retry-After": str(RETRY_AFTER_S)})


# The most specific kind first: a timeout is also an engine failure.
SERVICE_STATUSES: tuple[tuple[type[ServiceError], int], ...] = (
    (BadInput, 400),
    (NotFound, 404),
    (UnusableAvatar, 422),
    (Busy, 503),
    (EngineTimedOut, 504),
    (EngineFailed, 502),
)


def service_failure(error: ServiceError) -> ApiError:
    status = next((status for kind, status in SERVICE_STATUSES if isinstance(error, kind)), 500)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(error, Busy) else None
    return ApiError(status, error.code, error.message, headers)


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def _code(reason: str) -> str:
    return reason.lower().replace(" ", "_")


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: whatever goes wrong below it, the client gets JSON and a status."""
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except ServiceError as error:
        return service_failure(error).response()
    except web.HTTPRequestEntityTooLarge:
        return json_error(413, "too_large", f"request body over the limit of {request.client_max_size} bytes")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return json_error(error.status, _code(error.reason), error.text or error.reason)
    except HttpProcessingError as error:  # aiohttp could not parse what was sent (a multipart body, say)
        return json_error(400, "bad_request", f"the request could not be read: {error.message}")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal", "internal server error; the server log has the details")


async def json_body(request: web.Request, *, optional: bool = False) -> dict[str, object]:
    """The request's body as a JSON object ({} for an empty body when ``optional``)."""
    if optional and not request.can_read_body:
        return {}
    try:
        return json_object(await request.read())
    except BadMessage as error:
        raise bad_request(f"body must be a JSON object; it is {error}") from None


def field(body: dict[str, object], name: str, check: Callable[[object], T]) -> T:
    """``check(body[name])``, a BadMessage from it becoming a 400 that says what is wrong."""
    try:
        return check(body.get(name))
    except BadMessage as error:
        raise bad_request(str(error)) from None

"""What can go wrong with a model request, in words a caller can act on; http/errors.py gives each its status."""

from __future__ import annotations


class ServiceError(Exception):
    code = "service_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(ServiceError):
    """The request itself is wrong: bad base64, audio that does not decode, empty or overlong text."""

    code = "bad_request"


class NotFound(ServiceError):
    """It names a persona, voice, avatar or file that does not exist; the message lists what does."""

    code = "not_found"


class Busy(ServiceError):
    """Every render slot and queue place is taken: try again later."""

    code = "busy"


class EngineFailed(ServiceError):
    """A model failed or missed its deadline; the message says which and why."""

    code = "engine_failed"


class EngineTimedOut(EngineFailed):
    code = "engine_timeout"


def not_found(kind: str, requested: object, available: list[str]) -> NotFound:
    return NotFound(f"unknown {kind} {repr(requested)[:80]}; available: {', '.join(available) or 'none'}")


class UnusableAvatar(ServiceError):
    """The avatar exists but cannot be used (its picture has no face, say)."""

    code = "bad_avatar"

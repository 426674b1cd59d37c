"""What the HTTP handlers share: the application's keys, and the choices every new session makes."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from engines.avatar import Avatar
from media_server.access import json_error
from media_server.metrics import ServerMetrics
from media_server.pipeline import ConversationSetup
from media_server.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
SESSIONS = web.AppKey("sessions", dict)  # talk sessions by id
BROADCASTS = web.AppKey("broadcasts", dict)  # broadcast sessions by id
METRICS = web.AppKey("metrics", ServerMetrics)
AVATAR_MASKS = web.AppKey("avatar_masks", dict)  # avatar name -> PNG bytes of its cut-out
RETRY_AFTER_S = 10


@dataclass(frozen=True)
class Choices:
    avatar: str
    persona: str
    voice: str


def _choice(requested: object, available: list[str], kind: str, default: str) -> str:
    if requested is None:
        return default
    if not isinstance(requested, str) or requested not in available:
        raise web.HTTPNotFound(text=f"unknown {kind} {requested!r}; available: {', '.join(available)}")
    return requested


def choices_from(body: dict[str, object], runtime: Runtime) -> Choices:
    """The avatar, persona and voice a request names, or the defaults; 404 naming the available ones."""
    server = runtime.settings.server
    avatar = _choice(body.get("avatar"), runtime.avatars.names(), "avatar", server.default_avatar)
    persona = _choice(body.get("persona"), list(runtime.personas), "persona", server.default_persona)
    voice = _choice(body.get("voice"), runtime.engines.tts.voices, "voice", runtime.voice_for(persona))
    return Choices(avatar, persona, voice)


def conversation_setup(runtime: Runtime, metrics: ServerMetrics, avatar: Avatar, chosen: Choices) -> ConversationSetup:
    return ConversationSetup(
        settings=runtime.settings,
        engines=runtime.engines,
        metrics=metrics,
        avatar=avatar,
        persona=runtime.personas[chosen.persona],
        voice=chosen.voice,
    )


def open_sessions(app: web.Application) -> int:
    """Talk and broadcast sessions together: both cost the same (a timeline, lip-sync and encoding)."""
    return len(app[SESSIONS]) + len(app[BROADCASTS])


def update_session_gauge(app: web.Application) -> None:
    app[METRICS].sessions.set(open_sessions(app))


def refusal_when_full(app: web.Application) -> web.Response | None:
    """503 with Retry-After when every session slot is taken, else None."""
    limit = app[RUNTIME].settings.server.max_sessions
    if open_sessions(app) < limit:
        return None
    return json_error(
        503,
        "server_full",
        f"all {limit} sessions are in use; try again shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )

"""What every request that opens a session or a viewer needs: the avatar, persona and voice it names,
the loaded avatar, a rate limit per client, and an SDP offer that can actually connect."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from aiortc import RTCSessionDescription
from aiortc.sdp import SessionDescription

from engines.avatar import AvatarError
from media_server.http.errors import ApiError, bad_request
from media_server.http.limits import FORWARDED_CLIENT, client_address
from media_server.http.state import CLUSTER, METRICS, OFFER_LIMITER, RUNTIME
from media_server.runtime import Runtime
from media_server.sessions.base import ConversationMemory, SessionSetup


@dataclass(frozen=True)
class Choices:
    avatar: str
    persona: str
    voice: str


def _choice(requested: object, available: list[str], kind: str, default: str) -> str:
    if requested is None:
        return default
    if not isinstance(requested, str) or requested not in available:
        shown = repr(requested)[:80]
        raise ApiError(404, "not_found", f"unknown {kind} {shown}; available: {', '.join(available)}")
    return requested


def choices_from(body: dict[str, object], runtime: Runtime) -> Choices:
    """The avatar, persona and voice a request names, or the defaults; 404 naming the available ones."""
    server = runtime.settings.server
    avatar = _choice(body.get("avatar"), runtime.avatars.names(), "avatar", server.default_avatar)
    persona = _choice(body.get("persona"), list(runtime.personas), "persona", server.default_persona)
    voice = _choice(body.get("voice"), runtime.engines.tts.voices, "voice", runtime.voice_for(persona))
    return Choices(avatar, persona, voice)


async def fetch_avatar_named(app: web.Application, body: dict[str, object]) -> None:
    """In a cluster, an avatar this node lacks is fetched from the cluster before the request is checked."""
    node, name = app.get(CLUSTER), body.get("avatar")
    if node is not None and isinstance(name, str) and name not in app[RUNTIME].avatars.names():
        await node.avatars.ensure(name)


async def session_setup(app: web.Application, chosen: Choices, memory: ConversationMemory | None = None) -> SessionSetup:
    """The setup of a new session: its avatar loaded and prepared for lip-sync (422 if it cannot be)."""
    runtime = app[RUNTIME]
    try:
        avatar = await asyncio.to_thread(runtime.avatars.get, chosen.avatar)
        await asyncio.to_thread(runtime.engines.lipsync.prepare, avatar)
    except AvatarError as error:
        raise ApiError(422, "bad_avatar", f"avatar {chosen.avatar!r} cannot be used: {error}") from None
    return SessionSetup(
        settings=runtime.settings,
        engines=runtime.engines,
        metrics=app[METRICS],
        avatar=avatar,
        persona=runtime.personas[chosen.persona],
        voice=chosen.voice,
        memory=memory,
        knowledge=runtime.knowledge,
    )


def count_offer(request: web.Request) -> None:
    """429 when this client has opened ``server.offers_per_minute`` sessions or viewers in the last minute
    (counted by the node the client reached, not again by the node it forwarded the offer to)."""
    if request.get(FORWARDED_CLIENT):
        return
    retry_after = request.app[OFFER_LIMITER].retry_after(client_address(request))
    if retry_after is not None:
        limit = request.app[RUNTIME].settings.server.offers_per_minute
        message = f"more than {limit} offers a minute from this address (server.offers_per_minute); wait and retry"
        raise ApiError(429, "too_many_offers", message, {"Retry-After": str(retry_after)})


def connectable_offer(sdp: str) -> RTCSessionDescription:
    """``sdp`` as an offer, or 400 saying why it could never connect (such a session would only hold a slot)."""
    if not sdp.startswith("v=0") or "m=" not in sdp:
        raise bad_request("sdp is not a session description (it must start with v=0 and hold m= lines)")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception:  # aiortc's parser fails with assorted exception types
        raise bad_request("the offer's SDP could not be parsed", "bad_sdp") from None
    if not parsed.media:
        raise bad_request("the offer has no media sections", "bad_sdp")
    for media in parsed.media:
        if media.port == 0:
            continue  # a rejected section
        if not 0 < media.port < 65536:
            raise bad_request(f"the offer's {media.kind} section has port {media.port}", "bad_sdp")
        if media.dtls is None or not media.dtls.fingerprints:
            raise bad_request(f"the offer's {media.kind} section has no DTLS fingerprint (a=fingerprint)", "bad_sdp")
        if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
            raise bad_request(f"the offer's {media.kind} section has no ICE credentials (a=ice-ufrag, a=ice-pwd)", "bad_sdp")
    candidates = [candidate for media in parsed.media for candidate in media.ice_candidates]
    if not candidates:
        raise bad_request(
            "the offer holds no ICE candidates: wait for ICE gathering to complete before sending it", "bad_sdp"
        )
    if not all(0 < candidate.port < 65536 for candidate in candidates):
        raise bad_request("the offer has an ICE candidate with an impossible port", "bad_sdp")
    return RTCSessionDescription(sdp=sdp, type="offer")

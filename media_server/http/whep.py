"""WHEP (the IETF WebRTC-HTTP Egress Protocol): any WHEP player pulls a broadcast session's audio and video.

``POST /whep/{id}`` (or ``POST /whep`` for the default broadcast) with an SDP offer as
``application/sdp`` answers ``201 Created`` with the SDP answer and a ``Location`` header naming the
viewer's resource; ``DELETE`` on that URL ends it. The answer holds every ICE candidate, so there
is no trickle ICE (``PATCH`` gets 405). The configured ICE servers go out as ``Link`` headers.

The default broadcast (``broadcast.default_id``) starts by itself for its first viewer, so a streamer
who adds /obs to OBS sees the avatar at once; it stops again after its last viewer has gone.
"""

from __future__ import annotations

from aiohttp import web

from media_server.config import IceServer
from media_server.http.broadcasts import broadcast_of, open_broadcast
from media_server.http.errors import ApiError, bad_request, busy
from media_server.http.opening import choices_from, connectable_offer, count_offer
from media_server.http.state import ON_DEMAND_START, RUNTIME, SESSIONS
from media_server.sessions.broadcast import BroadcastSession, ViewerLimitReached

SDP_TYPE = "application/sdp"


def _link(server: IceServer) -> list[str]:
    extra = ""
    if server.username is not None and server.credential is not None:
        extra = f'; username="{server.username}"; credential="{server.credential}"; credential-type="password"'
    return [f'<{url}>; rel="ice-server"{extra}' for url in server.urls]


def _ice_links(request: web.Request) -> dict[str, str]:
    links = [link for server in request.app[RUNTIME].settings.server.ice_servers for link in _link(server)]
    return {"Link": ", ".join(links)} if links else {}


async def _watched_broadcast(request: web.Request) -> BroadcastSession:
    """The broadcast the request names; the default one is started on demand if it is not running."""
    runtime = request.app[RUNTIME]
    default_id = runtime.settings.broadcast.default_id
    session_id = request.match_info.get("session_id", default_id)
    if session_id == default_id:
        async with request.app[ON_DEMAND_START]:  # viewers arriving together start it once
            if session_id not in request.app[SESSIONS].broadcasts:
                return await open_broadcast(request.app, default_id, choices_from({}, runtime), on_demand=True)
    return broadcast_of(request)


async def offer(request: web.Request) -> web.Response:
    if request.content_type != SDP_TYPE:
        raise ApiError(415, "unsupported_media_type", f"a WHEP offer is SDP: send it with Content-Type: {SDP_TYPE}")
    try:
        sdp = (await request.read()).decode()
    except UnicodeDecodeError:
        raise bad_request("the body is not UTF-8 text") from None
    description = connectable_offer(sdp)
    count_offer(request)
    session = await _watched_broadcast(request)
    try:
        viewer = await session.add_viewer(description)
    except ViewerLimitReached as error:
        raise busy("too_many_viewers", str(error)) from None
    except Exception as error:  # aiortc rejects unusable SDP with assorted exception types
        raise bad_request(f"the offer could not be accepted: {error}", "bad_sdp") from None
    headers = {"Location": f"/whep/{session.id}/{viewer.id}", **_ice_links(request)}
    return web.Response(status=201, text=viewer.pc.localDescription.sdp, content_type=SDP_TYPE, headers=headers)


async def stop(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].broadcasts.get(request.match_info["session_id"])
    viewer_id = request.match_info["viewer_id"]
    if session is None or not await session.remove_viewer(viewer_id):
        raise ApiError(404, "no_viewer", "no such WHEP viewer (it may have ended already)")
    return web.json_response({"closed": viewer_id})

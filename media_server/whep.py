"""WHEP (the IETF WebRTC-HTTP Egress Protocol): any WHEP player pulls a broadcast session's audio and video.

``POST /whep/{id}`` (or ``POST /whep`` for the default broadcast) with an SDP offer as
``application/sdp`` answers ``201 Created`` with the SDP answer and a ``Location`` header naming the
viewer's resource; ``DELETE`` on that URL ends it. The answer holds every ICE candidate, so there
is no trickle ICE (``PATCH`` gets 405). The configured ICE servers go out as ``Link`` headers.
"""

from __future__ import annotations

from aiohttp import web
from aiortc import RTCSessionDescription

from media_server.access import json_error
from media_server.app_state import BROADCASTS, RETRY_AFTER_S, RUNTIME
from media_server.broadcast import ViewerLimitReached, broadcast_of
from media_server.config import IceServer

SDP_TYPE = "application/sdp"


def _link(server: IceServer) -> list[str]:
    extra = ""
    if server.username is not None and server.credential is not None:
        extra = f'; username="{server.username}"; credential="{server.credential}"; credential-type="password"'
    return [f'<{url}>; rel="ice-server"{extra}' for url in server.urls]


def _ice_links(request: web.Request) -> dict[str, str]:
    links = [link for server in request.app[RUNTIME].settings.server.ice_servers for link in _link(server)]
    return {"Link": ", ".join(links)} if links else {}


async def offer(request: web.Request) -> web.Response:
    if request.content_type != SDP_TYPE:
        return json_error(415, "unsupported_media_type", f"a WHEP offer is SDP: send it with Content-Type: {SDP_TYPE}")
    session = broadcast_of(request)
    sdp = await request.text()
    if not sdp.startswith("v=0") or "m=" not in sdp:
        return json_error(
            400, "bad_request", "the body is not a session description (it must start with v=0 and hold m= lines)"
        )
    try:
        viewer = await session.add_viewer(RTCSessionDescription(sdp=sdp, type="offer"))
    except ViewerLimitReached as error:
        return json_error(503, "too_many_viewers", str(error), headers={"Retry-After": str(RETRY_AFTER_S)})
    except Exception as error:  # aiortc rejects unusable SDP with assorted exception types
        return json_error(400, "bad_sdp", f"the offer could not be accepted: {error}")
    headers = {"Location": f"/whep/{session.id}/{viewer.id}", **_ice_links(request)}
    return web.Response(status=201, text=viewer.pc.localDescription.sdp, content_type=SDP_TYPE, headers=headers)


async def stop(request: web.Request) -> web.Response:
    session = request.app[BROADCASTS].get(request.match_info["session_id"])
    viewer_id = request.match_info["viewer_id"]
    if session is None or not await session.remove_viewer(viewer_id):
        return json_error(404, "no_viewer", "no such WHEP viewer (it may have ended already)")
    return web.json_response({"closed": viewer_id})


def add_whep_routes(app: web.Application) -> None:
    app.router.add_post("/whep", offer)
    app.router.add_post("/whep/{session_id}", offer)
    app.router.add_delete("/whep/{session_id}/{viewer_id}", stop)

"""Talk sessions over HTTP: ``POST /offer`` opens one (a browser's peer connection), ``DELETE /sessions/{id}``
closes it."""

from __future__ import annotations

import uuid

from aiohttp import web

from media_server.http.cluster import conversation_memory, placed_elsewhere
from media_server.http.errors import ApiError, bad_request, busy, field, json_body
from media_server.http.opening import choices_from, connectable_offer, count_offer, fetch_avatar_named, session_setup
from media_server.http.state import RUNTIME, SESSIONS
from media_server.sessions.messages import checked_conversation_id
from media_server.sessions.registry import ServerFull
from media_server.sessions.talk import TalkSession


async def offer(request: web.Request) -> web.Response:
    body = await json_body(request)
    if not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
        raise bad_request('body must be a JSON object with a string "sdp" and "type": "offer"')
    sdp = str(body["sdp"])
    if not sdp.startswith("v=0") or "m=" not in sdp:
        raise bad_request("sdp is not a session description (it must start with v=0 and hold m= lines)")
    await fetch_avatar_named(request.app, body)
    chosen = choices_from(body, request.app[RUNTIME])
    conversation_id = field(body, "conversation", checked_conversation_id) if body.get("conversation") else uuid.uuid4().hex
    count_offer(request)
    if (answer := await placed_elsewhere(request)) is not None:
        return answer
    memory = await conversation_memory(request.app, conversation_id)
    sessions = request.app[SESSIONS]
    try:
        reservation = sessions.reserve()
    except ServerFull as error:
        raise busy("server_full", str(error)) from None
    with reservation as slot:
        description = connectable_offer(sdp)
        session = TalkSession(await session_setup(request.app, chosen, memory), sessions.forget)
        try:
            answer = await session.accept(description)
        except Exception as error:  # aiortc rejects unusable SDP with assorted exception types
            await session.close()
            raise bad_request(f"the offer could not be accepted: {error}", "bad_sdp") from None
        except BaseException:
            await session.close()
            raise
        slot.commit(session)
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.id})


async def delete_session(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].talks.get(request.match_info["session_id"])
    if session is None:
        raise ApiError(404, "no_session", "no such session (it may have ended already)")
    await session.close()
    return web.json_response({"closed": session.id})

"""What the server tells about itself: health, metrics, the choices it offers, avatar cut-outs."""

from __future__ import annotations

import asyncio

from aiohttp import web

from engines.avatar import AvatarError
from media_server.http.errors import ApiError
from media_server.http.state import AVATAR_MASKS, CLUSTER, METRICS, RUNTIME, SESSIONS
from media_server.media.segmentation import mask_png


async def healthz(request: web.Request) -> web.Response:
    """Answers once the server listens, which is after every engine has loaded and warmed up."""
    engines = request.app[RUNTIME].engines.descriptions
    sessions = request.app[SESSIONS]
    health: dict[str, object] = {
        "status": "ok",
        "engines": {stage: description["engine"] for stage, description in engines.items()},
        "sessions": len(sessions.talks),
        "broadcasts": len(sessions.broadcasts),
    }
    if (node := request.app.get(CLUSTER)) is not None:
        nodes = node.nodes()
        health["cluster"] = {
            "name": node.link.settings.name,
            "node_id": node.link.node_id,
            "connected": node.link.connected,
            "nodes": sum(entry.role == "node" for entry in nodes),
            "workers": sum(entry.role == "worker" for entry in nodes),
        }
    return web.json_response(health)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def options(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    server = runtime.settings.server
    node = request.app.get(CLUSTER)
    return web.json_response(
        {
            "avatars": node.avatar_names() if node is not None else runtime.avatars.names(),
            "personas": {name: p.display_name for name, p in runtime.personas.items()},
            "languages": {name: p.language for name, p in runtime.personas.items()},
            # The bases each persona answers from (whether they exist yet or not): where the page adds documents.
            "knowledge": {name: list(p.knowledge_bases) for name, p in runtime.personas.items()},
            "voices": runtime.engines.tts.voices,
            "defaults": {"avatar": server.default_avatar, "persona": server.default_persona},
            "ice_servers": [s.model_dump(exclude_none=True) for s in server.ice_servers],
            "ice_transport_policy": "relay" if server.relay_only else "all",
        }
    )


async def avatar_mask(request: web.Request) -> web.Response:
    """The avatar cut out from its background (PNG, white with the person as alpha), for /obs backdrops."""
    runtime, masks = request.app[RUNTIME], request.app[AVATAR_MASKS]
    name = request.match_info["name"]
    if name not in runtime.avatars.names():
        available = ", ".join(runtime.avatars.names())
        raise ApiError(404, "not_found", f"unknown avatar {name[:64]!r}; available: {available}")
    if name not in masks:
        try:
            avatar = await asyncio.to_thread(runtime.avatars.get, name)
        except AvatarError as error:
            raise ApiError(422, "bad_avatar", f"avatar {name!r} cannot be used: {error}") from None
        masks[name] = await asyncio.to_thread(mask_png, avatar)
    return web.Response(body=masks[name], content_type="image/png", headers={"Cache-Control": "max-age=3600"})

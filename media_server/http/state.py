"""What the HTTP handlers share, as the application's keys."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from media_server.http.limits import OfferLimiter
from media_server.metrics import ServerMetrics
from media_server.runtime import Runtime
from media_server.service.service import ModelService
from media_server.sessions.registry import SessionRegistry

if TYPE_CHECKING:  # the cluster (and NATS) is imported only when one is configured
    from media_server.cluster.node import ClusterNode

RUNTIME = web.AppKey("runtime", Runtime)
SESSIONS = web.AppKey("sessions", SessionRegistry)
METRICS = web.AppKey("metrics", ServerMetrics)
OFFER_LIMITER = web.AppKey("offer_limiter", OfferLimiter)
ON_DEMAND_START = web.AppKey("on_demand_start", asyncio.Lock)  # held while the default broadcast starts
AVATAR_MASKS = web.AppKey("avatar_masks", dict)  # avatar name -> PNG bytes of its cut-out
SERVICE = web.AppKey("service", ModelService)  # the model APIs' work (openai_api.py, opea.py)
ROUTE_TABLE = web.AppKey("route_table", tuple)  # http/app.py's ROUTES, which /openapi.json describes
CLUSTER: web.AppKey[ClusterNode] = web.AppKey("cluster")  # present only with [cluster] url

"""``GET /openapi.json``: the OpenAPI 3.0 document of every API in the route table, built from the routes
themselves (each carries its ``Operation``), so it cannot leave one out (tests/test_openapi.py checks it,
and fuzzes the server against it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from media_server.config import Settings
from media_server.http.access import Access
from media_server.http.state import ROUTE_TABLE, RUNTIME

if TYPE_CHECKING:
    from media_server.http.app import Route

Schema = dict[str, Any]
PATH_PARAMETER = re.compile(r"\{(\w+)\}")
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


@dataclass(frozen=True)
class Limit:
    """A number in a schema that is a setting (``"api.max_text_chars"``): the document shows its value."""

    setting: str


@dataclass(frozen=True)
class Body:
    content_type: str
    schema: Schema
    description: str = ""


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    request: Body | None = None
    responses: dict[int, Body] = field(default_factory=dict)  # successes; every error is the JSON error
    description: str = ""


def json_body(schema: Schema, description: str = "") -> Body:
    return Body("application/json", schema, description)


def _resolved(value: Any, settings: Settings) -> Any:
    if isinstance(value, Limit):
        section, key = value.setting.split(".")
        return getattr(getattr(settings, section), key)
    if isinstance(value, dict):
        return {key: _resolved(item, settings) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolved(item, settings) for item in value]
    return value


def _content(body: Body) -> dict[str, Any]:
    return {body.content_type: {"schema": body.schema}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def _operation(route: Route) -> dict[str, Any]:
    doc = route.doc
    module = route.handler.__module__.rsplit(".", 1)[-1]
    successes = {
        str(status): {"description": body.description or "OK", "content": _content(body)}
        for status, body in doc.responses.items()
    }
    operation: dict[str, Any] = {
        "operationId": f"{route.method.lower()}_{module}_{route.handler.__name__}",
        "summary": doc.summary,
        "tags": [doc.tag],
        "responses": {
            **successes,
            "4XX": _error("what is wrong with the request, and what to do"),
            "5XX": _error("the server is full (503, with Retry-After), or a model failed or missed its deadline"),
        },
    }
    if doc.description:
        operation["description"] = doc.description
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in PATH_PARAMETER.findall(route.path)
    ]
    if parameters:
        operation["parameters"] = parameters
    if doc.request is not None:
        operation["requestBody"] = {"required": True, "content": _content(doc.request)}
    if route.access is Access.CONTROL:
        # A token when server.api_token is set; none from this machine until then.
        operation["security"] = [{"bearer": []}, {}]
    return operation


def document(routes: tuple[Route, ...], settings: Settings) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return _resolved(
        {
            "openapi": "3.0.3",
            "info": {
                "title": "Facecast",
                "version": "1",
                "description": "A live talking-avatar server: WebRTC talk sessions, broadcast sessions watched "
                "over WHEP, and OpenAI- and OPEA-compatible model APIs. Details: docs/protocol.md.",
            },
            "paths": paths,
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        },
        settings,
    )


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document(request.app[ROUTE_TABLE], request.app[RUNTIME].settings))

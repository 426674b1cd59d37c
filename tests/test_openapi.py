"""``GET /openapi.json`` describes every API the server has, and nothing it lacks; and the server, fuzzed
against that document with schemathesis, never answers 5xx nor shows a stack trace."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import aiohttp
import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from engines.tts.piper.engine import PiperTTS
from media_server.http.app import ROUTES, create_app
from media_server.http.openapi import document
from media_server.runtime import Runtime
from media_server.testing.servers import serving

# Operations that would start RTMP pushes to whatever URL the fuzzer writes (never to reach past this
# machine), or fill every session slot with broadcasts: checked by tests/test_broadcast.py instead.
NOT_FUZZED = ("POST /api/sessions", "POST /api/sessions/{session_id}/rtmp")
EXAMPLES_PER_OPERATION = 25  # for each of valid and invalid requests: the whole run stays under a minute or two
STACK_TRACE_MARKS = (b"Traceback (most recent call last)", b'File "/')


def test_every_route_is_documented_and_every_documented_path_exists(runtime: Runtime) -> None:
    app = create_app(runtime)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {
        (method.upper(), path) for path, operations in document(ROUTES, runtime.settings)["paths"].items() for method in operations
    }
    pages = {("GET", path) for path in ("/", "/kiosk", "/obs", "/embed.js", "/static/{path}")}
    assert documented == served - pages


async def test_the_document_is_served_with_the_settings_limits(base_url: str, runtime: Runtime) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/openapi.json") as response:
        served = await response.json()
    assert served == document(ROUTES, runtime.settings)
    speech = served["paths"]["/v1/audio/speech"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert speech["properties"]["input"]["maxLength"] == runtime.settings.api.max_text_chars
    assert served["paths"]["/v1/avatarchatbot"]["post"]["security"] == [{"bearer": []}, {}]


@pytest.fixture(scope="module")
def fuzzed_runtime(runtime: Runtime) -> Iterator[Runtime]:
    """The test server's engines, with short texts and audio so that each fuzzed request is quick, and a
    voice with the default patience (the shared one gives up after 2 s, for the hung-worker test)."""
    api = runtime.settings.api.model_copy(update={"max_text_chars": 120, "max_audio_s": 5.0})
    voice = PiperTTS(PiperTTS.Settings())
    yield dataclasses.replace(
        runtime,
        settings=runtime.settings.model_copy(update={"api": api}),
        engines=dataclasses.replace(runtime.engines, tts=voice),
    )
    voice.close()


@pytest.fixture(scope="module")
def fuzzed_url(fuzzed_runtime: Runtime) -> Iterator[str]:
    with serving(create_app(fuzzed_runtime)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def api_schema(fuzzed_runtime: Runtime, fuzzed_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_dict(document(ROUTES, fuzzed_runtime.settings))


# WHEP offers are SDP: text, sent as it is.
schemathesis.serializer.alias("application/sdp", "text/plain")


def fuzzed_operations(schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    operations = [result.ok() for result in schema.get_all_operations()]
    return [operation for operation in operations if operation.label not in NOT_FUZZED]


def test_fuzzed_requests_never_get_a_server_error_or_a_stack_trace(api_schema: schemathesis.BaseSchema, fuzzed_url: str) -> None:
    """Requests generated from each operation's schema (valid ones, and ones that break it) for every
    operation in turn: each answer is a status and body the document allows, never 5xx, never a trace."""
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]

    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=fuzzed_url, timeout=60)
        case.validate_response(response, checks=checks)
        assert not any(mark in response.content for mark in STACK_TRACE_MARKS), response.content[:500]

    for operation in fuzzed_operations(api_schema):
        # Only a body can be broken: any string is a valid path parameter.
        modes = [schemathesis.GenerationMode.POSITIVE] + [schemathesis.GenerationMode.NEGATIVE] * bool(operation.body)
        for mode in modes:
            fuzz = hypothesis.given(case=operation.as_strategy(generation_mode=mode))(check)
            hypothesis.settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.generate],
            )(fuzz)()

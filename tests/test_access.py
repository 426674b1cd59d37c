"""Who may use the server, over real HTTP: CORS for other sites' pages, ICE options, HTTPS."""

from __future__ import annotations

import dataclasses
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from media_server.cli.main import _settings, build_parser, tls_context
from media_server.config import ConfigError, IceServer
from media_server.http.app import create_app

ALLOWED = "http://allowed.example:8000"
OTHER = "http://other.example"
TURN = IceServer(urls=["turn:turn.example.org:3478"], username="user", credential="secret")


async def serve(app: web.Application, context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest_asyncio.fixture(scope="module")
async def site(runtime) -> AsyncIterator[str]:
    """A server on the shared engines that allows one other origin and only TURN relays."""
    server = runtime.settings.server.model_copy(
        update={"allowed_origins": [ALLOWED], "ice_servers": [TURN], "relay_only": True}
    )
    app = create_app(dataclasses.replace(runtime, settings=runtime.settings.model_copy(update={"server": server})))
    runner, port = await serve(app)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def get(url: str, **kwargs) -> tuple[int, dict | str, dict]:
    async with aiohttp.ClientSession() as http, http.get(url, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body, dict(response.headers)


async def test_an_allowed_origin_gets_cors_headers_and_the_ice_options(site):
    status, body, headers = await get(f"{site}/api/options", headers={"Origin": ALLOWED})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ALLOWED
    assert body["ice_transport_policy"] == "relay"
    assert body["ice_servers"] == [{"urls": ["turn:turn.example.org:3478"], "username": "user", "credential": "secret"}]
    # facecast.js is imported across origins by embed.js: a module script needs CORS too.
    status, _, headers = await get(f"{site}/static/facecast.js", headers={"Origin": ALLOWED})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_another_origin_is_refused_with_a_message_it_can_read(site):
    status, body, headers = await get(f"{site}/api/options", headers={"Origin": OTHER})
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    assert OTHER in body["error"]["message"] and "server.allowed_origins" in body["error"]["message"]
    assert headers["Access-Control-Allow-Origin"] == OTHER  # else the browser hides the reason from the page
    async with aiohttp.ClientSession() as http:
        preflight = {
            "Origin": OTHER,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }
        async with http.options(f"{site}/offer", headers=preflight) as response:
            assert response.status == 204 and response.headers["Access-Control-Allow-Origin"] == OTHER
        async with http.post(
            f"{site}/offer", json={"sdp": "v=0", "type": "offer"}, headers={"Origin": OTHER}
        ) as response:
            assert response.status == 403
    status, _, headers = await get(f"{site}/static/facecast.js", headers={"Origin": OTHER})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


async def test_the_page_own_origin_needs_no_allowance(site):
    status, _, headers = await get(f"{site}/api/options", headers={"Origin": site})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_relay_only_needs_a_turn_server(runtime):
    with pytest.raises(ValueError, match="TURN"):
        runtime.settings.server.model_validate({**runtime.settings.server.model_dump(), "relay_only": True})


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_serve_over_https_with_tls_cert_and_key(runtime, certificate):
    cert, key = certificate
    args = build_parser().parse_args(
        ["serve", "--tls-cert", str(cert), "--tls-key", str(key), "--rtmp", "rtmp://x.example/live/key"]
    )
    settings = _settings(args)
    assert (settings.server.tls_cert, settings.server.tls_key) == (cert, key)
    assert settings.broadcast.rtmp_url == "rtmp://x.example/live/key"
    runner, port = await serve(create_app(runtime), tls_context(settings.server))
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"https://127.0.0.1:{port}/healthz", ssl=trusted) as response,
        ):
            assert response.status == 200 and (await response.json())["status"] == "ok"
    finally:
        await runner.cleanup()


def test_unreadable_tls_files_are_a_configuration_error(runtime, tmp_path):
    missing = runtime.settings.server.model_copy(
        update={"tls_cert": tmp_path / "no.pem", "tls_key": tmp_path / "no.key"}
    )
    with pytest.raises(ConfigError, match="tls_cert"):
        tls_context(missing)

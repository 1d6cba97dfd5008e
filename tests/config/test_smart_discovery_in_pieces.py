"""The SMART probe reads the discovery document to its end: a server that sends it in pieces
(as any real one may, over TCP) is read whole, not cut at the first piece and refused as
"not JSON" (the reviewer's proof: /tmp/review1/test_config_probe.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.config.conftest import (
    CONTOSO_ADMIN,
    ConfigPortal,
    Serve,
    config_portal,
    config_settings,
    table_counts,
)
from tests.conftest import wait_for

__all__ = ["config_portal", "config_settings"]

SMART_PATH = "/r4/t"


class PiecemealSmartServer:
    """Sends the discovery document in two chunks, the second only once the reader has been
    handed the first, so the first read can never return the whole document."""

    def __init__(self) -> None:
        self.url = ""
        self.first_piece_read = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get(f"{SMART_PATH}/.well-known/smart-configuration", self._smart)

    @property
    def fhir_base(self) -> str:
        return self.url + SMART_PATH

    def document(self) -> bytes:
        return orjson.dumps(
            {
                "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token",
                "jwks_uri": f"{self.url}/jwks",
                "code_challenge_methods_supported": ["S256"],
                "capabilities": ["launch-ehr"],
            }
        )

    async def _smart(self, request: web.Request) -> web.StreamResponse:
        body = self.document()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await wait_for(self.first_piece_read, "the probe to read the first piece")
        await response.write(body[len(body) // 2 :])
        await response.write_eof()
        return response


@pytest.fixture
async def piecemeal_server(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[PiecemealSmartServer]:
    server = PiecemealSmartServer()
    read = aiohttp.StreamReader.read

    async def noting_read(self: aiohttp.StreamReader, n: int = -1) -> bytes:
        data = await read(self, n)
        # Every client read in this process passes here; only the probe's starts the document.
        if data and server.document().startswith(data):
            server.first_piece_read.set()
        return data

    monkeypatch.setattr(aiohttp.StreamReader, "read", noting_read)
    async with serve(server.app) as url:
        server.url = url
        yield server


async def test_discovery_document_in_two_pieces_is_read_whole(
    config_portal: ConfigPortal, piecemeal_server: PiecemealSmartServer
) -> None:
    """A discovery document sent in two chunks is read to its end and the integration saved."""
    p = config_portal
    status, body = await p.call(
        CONTOSO_ADMIN,
        "POST",
        "/api/integrations",
        p.integration(fhir_base_url=piecemeal_server.fhir_base),
    )
    assert piecemeal_server.first_piece_read.is_set()
    assert status == 201, body
    assert body["smart_configuration"]["token_endpoint"] == f"{piecemeal_server.url}/token"
    assert (await table_counts(p.settings))["integrations"] == 1

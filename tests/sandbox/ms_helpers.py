"""Helpers for the Microsoft stand-in contract tests: an HTTPS webhook receiver and ACS signing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from sandbox.microsoft.clock import Clock
from sandbox.tls import TlsFiles


class Receiver:
    """An HTTPS endpoint (local CA) that answers Graph validation and records posted JSON."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self.received: list[Any] = []
        self.validations: list[str] = []
        self.echo_validation = True
        self.fail_next = 0
        self.failed = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls.server_context())
        await site.start()
        port = next(a[1] for a in self._runner.addresses if isinstance(a, tuple))
        self.url = f"https://127.0.0.1:{port}/hook"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        token = request.query.get("validationToken")
        if token is not None:
            self.validations.append(token)
            if not self.echo_validation:
                return web.Response(status=200, text="nope", content_type="text/plain")
            return web.Response(status=200, text=token, content_type="text/plain")
        if self.fail_next > 0:
            self.fail_next -= 1
            self.failed += 1
            return web.Response(status=503)
        payload = await request.json()
        async with self._changed:
            self.received.append(payload)
            self._changed.notify_all()
        return web.Response(status=202)

    async def wait_for(self, predicate: Callable[[list[Any]], bool]) -> None:
        """Block until ``predicate(received)`` holds (woken by each arrival, no polling)."""
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: predicate(self.received))

    def graph_notifications(self) -> list[dict[str, Any]]:
        return [n for batch in self.received if isinstance(batch, dict) for n in batch["value"]]

    def events(self) -> list[dict[str, Any]]:
        return [e for batch in self.received if isinstance(batch, list) for e in batch]


def acs_headers(
    access_key: str,
    method: str,
    url: str,
    body: bytes,
    clock: Clock,
    *,
    tamper_signature: bool = False,
    claimed_hash: str | None = None,
    skew_s: float = 0,
) -> dict[str, str]:
    """ACS HMAC-SHA256 headers, written independently of the stand-in from the protocol."""
    from datetime import timedelta

    parts = urlsplit(url)
    path_query = parts.path + ("?" + parts.query if parts.query else "")
    date = format_datetime(clock.now() + timedelta(seconds=skew_s), usegmt=True)
    content_hash = claimed_hash or base64.b64encode(hashlib.sha256(body).digest()).decode()
    to_sign = f"{method}\n{path_query}\n{date};{parts.netloc};{content_hash}"
    key = base64.b64decode(access_key)
    sig = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest()).decode()
    if tamper_signature:
        sig = base64.b64encode(b"x" * 32).decode()
    return {
        "x-ms-date": date,
        "x-ms-content-sha256": content_hash,
        "Authorization": (
            f"HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature={sig}"
        ),
        "Content-Type": "application/json",
    }


def dumps(data: Any) -> bytes:
    return json.dumps(data).encode()

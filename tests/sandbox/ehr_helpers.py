"""Helpers for the EHR stand-in contract tests: a plain-HTTP SMART client and a webhook receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
from aiohttp import web

from sandbox.ehr import RunningEhr

REDIRECT_URI = "http://127.0.0.1:9/callback"
SCOPE = (
    "launch openid fhirUser profile online_access user/Appointment.read "
    "user/Encounter.read user/Patient.read user/Practitioner.read user/Location.read"
)


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass
class Smart:
    """Drives the stand-in's SMART endpoints over HTTP, exactly as an app would."""

    ehr: RunningEhr
    http: aiohttp.ClientSession
    tenant: str

    @property
    def base(self) -> str:
        return self.ehr.fhir_base(self.tenant)

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, f"{self.ehr.url}{path}", json=body) as resp:
            assert resp.status < 300, await resp.text()
            return await resp.json()

    async def register(self, client_id: str, **extra: Any) -> None:
        body = {"client_id": client_id, "redirect_uris": [REDIRECT_URI], **extra}
        body.setdefault("client_secret", f"{client_id}-secret")
        await self.admin("POST", "/_sandbox/clients", body)

    async def appointments(self) -> list[dict[str, Any]]:
        rows = await self.admin("GET", f"/_sandbox/tenants/{self.tenant}/appointments")
        return list(rows["appointments"])

    async def launch(self, appointment: str | None = None) -> dict[str, Any]:
        if appointment is None:
            appointment = next(a["id"] for a in await self.appointments() if a["video"])
        path = f"/_sandbox/tenants/{self.tenant}/launches"
        return dict(await self.admin("POST", path, {"appointment": appointment}))

    async def config(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/.well-known/smart-configuration") as resp:
            return dict(await resp.json())

    async def authorize(
        self, client_id: str, launch: str, challenge: str, /, **override: str | None
    ) -> tuple[int, dict[str, str], str]:
        """GET authorize without following the redirect: (status, redirect query, location)."""
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": SCOPE,
            "state": "st-123",
            "launch": launch,
            "aud": self.base,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        params.update(override)
        query = {k: v for k, v in params.items() if v is not None}
        url = (await self.config())["authorization_endpoint"]
        async with self.http.get(url, params=query, allow_redirects=False) as resp:
            location = resp.headers.get("Location", "")
            parsed = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
            return resp.status, parsed, location

    async def token(
        self, form: dict[str, str], basic: tuple[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        url = (await self.config())["token_endpoint"]
        headers = {"Authorization": aiohttp.encode_basic_auth(*basic)} if basic else {}
        async with self.http.post(url, data=form, headers=headers) as resp:
            return resp.status, dict(await resp.json())

    async def jwks(self) -> jwt.PyJWKSet:
        async with self.http.get((await self.config())["jwks_uri"]) as resp:
            return jwt.PyJWKSet.from_dict(await resp.json())

    async def code_for(
        self, client_id: str, scope: str = SCOPE, nonce: str | None = None
    ) -> tuple[str, str]:
        """Launch + authorize: returns (code, verifier)."""
        launch = await self.launch()
        verifier, challenge = pkce_pair()
        status, query, _ = await self.authorize(
            client_id, launch["launch"], challenge, scope=scope, nonce=nonce
        )
        assert status == 302, query
        assert "code" in query, query
        return query["code"], verifier

    async def exchange(
        self, client_id: str, code: str, verifier: str
    ) -> tuple[int, dict[str, Any]]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        }
        return await self.token(form, (client_id, f"{client_id}-secret"))

    async def access_token(self, client_id: str, scope: str = SCOPE) -> dict[str, Any]:
        code, verifier = await self.code_for(client_id, scope)
        status, body = await self.exchange(client_id, code, verifier)
        assert status == 200, body
        return body

    async def fhir(
        self, path: str, token: str | None, base: str | None = None
    ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.get(f"{base or self.base}/{path}", headers=headers) as resp:
            return resp.status, dict(await resp.json(content_type=None)), resp


def verify_signature(
    secret: str, header: str, body: bytes, now: float, tolerance: int = 300
) -> bool:
    """Test-local verifier of the X-EHR-Signature contract (production has its own)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), parts.get("v1", ""))


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A tiny webhook subscriber: answers with ``statuses`` in turn, then 204."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    accepted: list[Received] = field(default_factory=list)
    _waiters: list[tuple[int, asyncio.Event]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        got = Received(dict(request.headers), await request.read())
        self.requests.append(got)
        status = self.statuses.pop(0) if self.statuses else 204
        if status < 300:
            self.accepted.append(got)
            for count, event in self._waiters:
                if len(self.accepted) >= count:
                    event.set()
        return web.Response(status=status)

    async def wait_for(self, count: int, within: float = 10) -> list[Received]:
        event = asyncio.Event()
        if len(self.accepted) >= count:
            event.set()
        self._waiters.append((count, event))
        await asyncio.wait_for(event.wait(), within)
        return self.accepted[:count]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ehr-feed", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/ehr-feed"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def wall_clock() -> float:
    return time.time()

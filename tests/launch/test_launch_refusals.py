from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from libs.common.web import DB_POOL
from sandbox.ehr import TENANT_A
from services.launch import join_tokens
from services.launch.integrations import IntegrationDirectory
from services.launch.smart import SmartClient, SmartError
from tests.conftest import running_app
from tests.launch.test_visit_end_to_end import book_video_visit
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem, follow

NOT_CONFIGURED = "This FHIR URL is not configured for the Teams connector"


class Trap:
    """A server that must never be called: any request to it is a leak."""

    def __init__(self) -> None:
        self.hits = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._hit)

    async def _hit(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({})


@pytest.fixture
async def trap() -> AsyncIterator[tuple[Trap, str]]:
    trap = Trap()
    async with running_app(trap.app) as url:
        yield trap, url


@pytest.mark.parametrize(
    "iss_suffix",
    ["/r4/unknown", "/r4/5f3c1a9e-2b7d-4e8a-9c41-0a1b2c3d4e01/", "@127.0.0.1/r4", "#frag"],
)
async def test_foreign_iss_is_refused_without_any_outbound_request(
    launch_system: LaunchSystem, trap: tuple[Trap, str], iss_suffix: str
) -> None:
    """An iss that is not byte-for-byte a configured FHIR base gets a clear 403 page and
    the gateway calls nothing."""
    server, url = trap
    async with aiohttp.ClientSession() as http:
        for path in ("/launch/provider", f"/launch/provider/{launch_system.integration_id}"):
            async with http.get(
                launch_system.url + path,
                params={"iss": url + iss_suffix, "launch": "abc"},
                allow_redirects=False,
            ) as r:
                assert r.status == 403
                assert NOT_CONFIGURED in await r.text()
    assert server.hits == 0


async def test_integration_route_refuses_another_integrations_iss(
    launch_system: LaunchSystem,
) -> None:
    """The launch URL of one integration does not accept another FHIR base's launch."""
    other = launch_system.ehr.fhir_base("8d2e4f60-7a1b-4c3d-8e5f-6a7b8c9d0e02")
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{launch_system.url}/launch/provider/{launch_system.integration_id}",
            params={"iss": other, "launch": "abc"},
            allow_redirects=False,
        ) as r,
    ):
        assert r.status == 403


async def test_missing_launch_parameters_are_refused(launch_system: LaunchSystem) -> None:
    """Without iss and launch the gateway answers 400."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{launch_system.url}/launch/provider", allow_redirects=False) as r,
    ):
        assert r.status == 400


async def _callback_url(http: aiohttp.ClientSession, system: LaunchSystem, appointment: str) -> str:
    async with http.post(
        f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/launches", json={"appointment": appointment}
    ) as r:
        launch_url = (await r.json())["launch_url"]
    async with http.get(launch_url, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        authorize = r.headers["Location"]
    query = parse_qs(urlsplit(authorize).query)
    assert query["aud"] == [system.fhir_base]
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["state"][0]) >= 22  # at least 128 bits
    async with http.get(authorize, allow_redirects=False) as r:
        assert r.status == 302
        return str(r.headers["Location"])


async def test_replayed_state_is_refused(launch_system: LaunchSystem) -> None:
    """The callback's state is single use: a replay gets 400 and starts no session."""
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, launch_system)
        callback = await _callback_url(http, launch_system, appointment["id"])
        first, _, _ = await follow(http, callback)
        assert first.status == 200
        async with http.get(callback, allow_redirects=False) as r:
            assert r.status == 400
            assert "expired or was already used" in await r.text()
            assert "provider_session" not in r.cookies


async def test_forged_state_is_refused(launch_system: LaunchSystem, database_url: str) -> None:
    """A state we never issued gets 400, and no token exchange happens."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{launch_system.url}/launch/callback",
            params={"state": "forged-state-value-forged-state", "code": "x"},
            allow_redirects=False,
        ) as r,
    ):
        assert r.status == 400
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM launch.provider_sessions") == 0
    finally:
        await conn.close()


async def test_id_token_with_wrong_key_or_none_alg_is_refused(launch_system: LaunchSystem) -> None:
    """An id_token signed by another key, or unsigned, fails validation against the JWKS."""
    system = launch_system
    directory = IntegrationDirectory(system.app[DB_POOL])
    integration = await directory.by_id(system.integration_id)
    assert integration is not None
    async with aiohttp.ClientSession() as http:
        smart = SmartClient(http, system.settings)
        config = await smart.discover(system.fhir_base)
        now = int(time.time())
        claims = {
            "iss": config.issuer,
            "aud": integration.smart_client_id,
            "sub": "x",
            "iat": now,
            "exp": now + 300,
            "nonce": "n",
        }
        foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        wrong_key = jwt.encode(claims, foreign, algorithm="RS256", headers={"kid": "k1"})
        with pytest.raises(SmartError):
            await smart.validate_id_token(integration, config, wrong_key, "n")
        unsigned = jwt.encode(claims, "", algorithm="none")
        with pytest.raises(SmartError, match="algorithm"):
            await smart.validate_id_token(integration, config, unsigned, "n")


async def test_expired_and_tampered_join_links_are_refused_and_change_nothing(
    launch_system: LaunchSystem, topic_prefix: str, database_url: str
) -> None:
    """The link of a visit that is over (its end plus grace has passed) answers 410, a
    tampered or unknown one 404; no arrival is recorded."""
    system = launch_system
    secret = system.settings.join_token_secret.get_secret_value()
    async with aiohttp.ClientSession() as http:
        await book_video_visit(http, system, timedelta(hours=-3))
        created = await read_all(topic_prefix + "appointment-created", expect=1)
        assert created
        conn = await asyncpg.connect(database_url)
        try:
            key = await conn.fetchval("SELECT appointment_key FROM launch.appointments")
        finally:
            await conn.close()
        expired = join_tokens.mint(secret, key, datetime.now(UTC) - timedelta(hours=2))
        async with http.get(f"{system.url}/join/{expired}") as r:
            assert r.status == 410
        valid = join_tokens.mint(secret, key, datetime.now(UTC) + timedelta(hours=1))
        body, signature = valid.split(".")
        tampered = body[:-1] + ("A" if body[-1] != "A" else "B") + "." + signature
        for token in (tampered, "not-a-token", valid + "x", "a.b"):
            async with http.get(f"{system.url}/join/{token}") as r:
                assert r.status == 404, token
        forged = join_tokens.mint("another-secret", key, datetime.now(UTC) + timedelta(hours=1))
        async with http.get(f"{system.url}/join/{forged}") as r:
            assert r.status == 404
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM launch.lobby_arrivals") == 0
        assert (
            await conn.fetchval("SELECT count(*) FROM launch.outbox WHERE topic = 'patient-joined'")
            == 0
        )
    finally:
        await conn.close()


async def test_graph_notification_with_wrong_client_state_is_refused(
    launch_system: LaunchSystem,
    topic_prefix: str,
    database_url: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """A notification for our subscription but with the wrong clientState gets 403 and
    changes no roster."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        await book_video_visit(http, system)
        await read_all(topic_prefix + "appointment-created", expect=1)
    conn = await asyncpg.connect(database_url)
    try:
        subscription = await conn.fetchval("SELECT subscription_id FROM launch.appointments")
    finally:
        await conn.close()
    forged = {
        "value": [
            {
                "subscriptionId": subscription,
                "clientState": "guessed",
                "resourceData": {
                    "eventType": "Microsoft.Communication.CallRosterUpdate",
                    "eventDateTime": datetime.now(UTC).isoformat(),
                    "activeParticipants@joined": [
                        {"Id": "leg", "Identity": {"Guest": {"Id": "g"}}, "IsInLobby": True}
                    ],
                },
            }
        ]
    }
    async with microsoft_http.post(
        f"{system.notification_url}/graph/notifications", json=forged
    ) as r:
        assert r.status == 403
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM launch.roster") == 0
    finally:
        await conn.close()


async def test_validation_token_is_echoed_as_text(
    launch_system: LaunchSystem, microsoft_http: aiohttp.ClientSession
) -> None:
    """Graph's subscription handshake gets its validationToken back as text/plain."""
    async with microsoft_http.post(
        f"{launch_system.notification_url}/graph/notifications",
        params={"validationToken": "Validation: token 123"},
    ) as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        assert await r.text() == "Validation: token 123"


def _sign(secret: str, body: bytes, at: int) -> str:
    return (
        f"t={at},v1="
        + hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    )


@pytest.mark.parametrize("case", ["unsigned", "wrong secret", "stale", "tampered body"])
async def test_forged_scheduling_webhook_is_refused(
    launch_system: LaunchSystem, database_url: str, case: str
) -> None:
    """An unsigned, wrongly signed, stale or altered scheduling event gets 401, changes nothing."""
    body = b'{"event_id": "0d6f3c1e-8f0a-4a55-9f67-3d1f0f0b8a11", "event": "booked"}'
    now = int(time.time())
    headers = {"X-EHR-Tenant": TENANT_A, "Content-Type": "application/json"}
    if case == "wrong secret":
        headers["X-EHR-Signature"] = _sign("not-the-secret", body, now)
    elif case == "stale":
        headers["X-EHR-Signature"] = _sign("scheduling-webhook-secret-for-tests", body, now - 3600)
    elif case == "tampered body":
        headers["X-EHR-Signature"] = _sign("scheduling-webhook-secret-for-tests", body, now)
        body = body.replace(b"booked", b"cancelled")
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{launch_system.url}/ehr/scheduling", data=body, headers=headers) as r,
    ):
        assert r.status == 401
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM launch.scheduling_deliveries") == 0
    finally:
        await conn.close()


async def test_signed_but_invalid_scheduling_event_gets_422(launch_system: LaunchSystem) -> None:
    """A correctly signed body that is not a valid event is refused with 422."""
    body = b'{"event_id": "nope", "event": "booked"}'
    headers = {
        "X-EHR-Tenant": TENANT_A,
        "X-EHR-Signature": _sign("scheduling-webhook-secret-for-tests", body, int(time.time())),
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{launch_system.url}/ehr/scheduling", data=body, headers=headers) as r,
    ):
        assert r.status == 422

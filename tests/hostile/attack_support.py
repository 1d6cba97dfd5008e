"""Shared pieces for the hostile-input tests: a launch gateway with two integrations (EHR
tenants A and B, each with its own scheduling secret), a log of every outbound request the
gateway starts, a SMART server that signs whatever id_token a test asks for, and checks that
a Location header stays on site."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import asyncpg
import jwt
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from libs.common.events import IntegrationConfigV1
from libs.common.kafka import create_producer
from sandbox.ehr import TENANT_A, TENANT_B, EhrSettings, RunningEhr, start_ehr
from sandbox.ehr.clock import FakeClock
from sandbox.microsoft import SandboxConfig, start_sandbox
from sandbox.tls import TlsFiles
from services.launch.app import create_app
from services.launch.outbound import HTTP
from services.launch.settings import LaunchSettings
from services.launch.state import INTEGRATIONS
from tests.conftest import KAFKA, PG_ADMIN_DSN, free_port, running_app, wait_for
from tests.support.launch_harness import (
    SMART_CLIENT_ID,
    SMART_CLIENT_SECRET,
    LaunchSystem,
    integration_config,
    publish_integration,
    serve_with_tls,
)

SECRET_A = "scheduling-secret-of-ehr-tenant-a"
SECRET_B = "scheduling-secret-of-ehr-tenant-b"
TENANT_OF = {TENANT_A: "contoso", TENANT_B: "fabrikam"}


class OutboundLog:
    """Every request the gateway's outbound client starts, recorded before it connects, so
    an attempt at an address nobody listens on is caught too."""

    def __init__(self) -> None:
        self.urls: list[URL] = []

    def attach(self, session: aiohttp.ClientSession) -> None:
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(self._started)
        trace.freeze()
        session.trace_configs.append(trace)

    async def _started(
        self,
        _session: aiohttp.ClientSession,
        _context: Any,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        self.urls.append(params.url)

    def origins(self) -> set[str]:
        return {f"{u.scheme}://{u.host}:{u.port}" for u in self.urls}

    def clear(self) -> None:
        self.urls.clear()


def origin(url: str) -> str:
    parts = URL(url)
    return f"{parts.scheme}://{parts.host}:{parts.port}"


@dataclass
class Gateway:
    """The launch gateway with integration A (EHR tenant A, M365 tenant contoso) and
    integration B (EHR tenant B, fabrikam); scheduling secrets per EHR tenant."""

    system: LaunchSystem
    integrations: dict[str, uuid.UUID]
    producer: AIOKafkaProducer
    topic_prefix: str
    database_url: str
    outbound: OutboundLog
    applied: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.system.url

    @property
    def ehr(self) -> RunningEhr:
        return self.system.ehr

    def fhir_base(self, tenant: str) -> str:
        return self.system.ehr.fhir_base(tenant)

    async def add_integration(self, tenant_id: str, config: IntegrationConfigV1) -> None:
        """Publishes an integration the way config does and waits until the gateway has it."""
        done = asyncio.Event()
        wanted = len(self.applied) + 1
        self.system.consumer.observe(lambda _: done.set() if len(self.applied) >= wanted else None)
        await publish_integration(self.producer, self.topic_prefix, tenant_id, config)
        await wait_for(done, "the gateway to learn the integration")
        self.system.app[INTEGRATIONS].invalidate()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.database_url, server_settings={"search_path": "launch"})
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    async def counts(self) -> dict[str, int]:
        """Rows in the tables an attack must not touch."""
        tables = (
            "appointments",
            "launch_states",
            "provider_sessions",
            "scheduling_deliveries",
            "roster",
            "graph_notifications",
            "lobby_arrivals",
            "outbox",
        )
        return {t: int(await self.fetchval(f"SELECT count(*) FROM {t}")) for t in tables}


@pytest.fixture(scope="module")
async def module_infra(infrastructure: None) -> AsyncIterator[tuple[str, str]]:
    """(database URL, topic prefix) shared by one module's tests, dropped afterwards: a
    gateway takes seconds to start, and the sweeps measure what changed, not absolutes."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    prefix = f"t{uuid.uuid4().hex[:10]}."
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name, prefix
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    kafka = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await kafka.start()
    try:
        mine = [t for t in await kafka.list_topics() if t.startswith(prefix)]
        if mine:
            await kafka.delete_topics(mine)
    finally:
        await kafka.close()


@pytest.fixture(scope="module")
async def gateway(module_infra: tuple[str, str], standin_tls: TlsFiles) -> AsyncIterator[Gateway]:
    """One gateway, EHR stand-in and Microsoft stand-in for a module's tests."""
    database_url, topic_prefix = module_infra
    async with AsyncExitStack() as stack:
        ehr = await start_ehr(
            EhrSettings(port=0, webhook_backoff_base=0.01, webhook_backoff_max=0.05), FakeClock()
        )
        stack.push_async_callback(ehr.close)
        microsoft = await start_sandbox(
            SandboxConfig(
                port=0,
                tls_dir=standin_tls.directory,
                lro_delay_s=0.2,
                validation_timeout_s=3,
                notification_retry_delays=(0.01, 0.05, 0.2),
            )
        )
        stack.push_async_callback(microsoft.stop)
        producer = create_producer(KAFKA)
        await producer.start()
        stack.push_async_callback(producer.stop)
        port, tls_port = free_port(), free_port()
        settings = LaunchSettings(
            database_url=database_url,
            kafka_bootstrap_servers=KAFKA,
            kafka_topic_prefix=topic_prefix,
            http_port=port,
            metrics_port=0,
            outbox_poll_interval_s=0.2,
            log_json=True,
            public_base_url=f"http://127.0.0.1:{port}",
            notification_base_url=f"https://127.0.0.1:{tls_port}",
            entra_authority_host=microsoft.base_url,
            graph_base_url=microsoft.base_url,
            tls_ca_bundle=str(standin_tls.ca),
            allow_loopback_http=True,
            scheduling_webhook_secrets=orjson.dumps(
                {TENANT_A: SECRET_A, TENANT_B: SECRET_B}
            ).decode(),
        )
        app = create_app(settings)
        ids = {TENANT_A: uuid.uuid4(), TENANT_B: uuid.uuid4()}
        outbound = OutboundLog()
        await stack.enter_async_context(serve_with_tls(app, port, tls_port, standin_tls))
        system = LaunchSystem(
            url=f"http://127.0.0.1:{port}",
            notification_url=f"https://127.0.0.1:{tls_port}",
            settings=settings,
            app=app,
            ehr=ehr,
            microsoft=microsoft,
            integration_id=ids[TENANT_A],
            fhir_base=ehr.fhir_base(TENANT_A),
        )
        gw = Gateway(system, ids, producer, topic_prefix, database_url, outbound)
        system.consumer.observe(lambda outcomes: gw.applied.extend(e for _, e, _ in outcomes))
        for tenant, integration_id in ids.items():
            config = integration_config(settings, integration_id, ehr.fhir_base(tenant))
            await gw.add_integration(TENANT_OF[tenant], config)
        async with aiohttp.ClientSession() as http:
            await register_both(http, gw)
        outbound.attach(app[HTTP])
        yield gw


async def register_both(http: aiohttp.ClientSession, gw: Gateway) -> None:
    """The Cerner side of both integrations: our SMART client, launch URLs, feeds."""
    body = {
        "client_id": SMART_CLIENT_ID,
        "redirect_uris": [f"{gw.url}/launch/callback"],
        "auth_method": "client_secret_basic",
        "client_secret": SMART_CLIENT_SECRET,
    }
    async with http.post(f"{gw.ehr.url}/_sandbox/clients", json=body) as r:
        assert r.status in (200, 201), await r.text()
    for tenant, secret in ((TENANT_A, SECRET_A), (TENANT_B, SECRET_B)):
        patch = {
            "webhook_url": f"{gw.url}/ehr/scheduling",
            "webhook_secret": secret,
            "launch_url": f"{gw.url}/launch/provider/{gw.integrations[tenant]}",
            "patient_launch_url": f"{gw.url}/launch/patient/{gw.integrations[tenant]}",
        }
        async with http.patch(f"{gw.ehr.url}/_sandbox/tenants/{tenant}", json=patch) as r:
            assert r.status == 200, await r.text()


async def mint_launch(
    http: aiohttp.ClientSession, gw: Gateway, tenant: str, persona: str = "provider"
) -> dict[str, Any]:
    """A launch the EHR issues for the first practitioner and patient of `tenant`."""
    base = f"{gw.ehr.url}/_sandbox/tenants/{tenant}"
    async with http.get(f"{base}/directory") as r:
        directory = await r.json()
    body: dict[str, Any] = {"persona": persona, "patient": directory["patients"][0]["id"]}
    if persona == "provider":
        body["practitioner"] = directory["practitioners"][0]["id"]
    async with http.post(f"{base}/launches", json=body) as r:
        assert r.status == 201, await r.text()
        minted: dict[str, Any] = await r.json()
        return minted


# --- Location headers -----------------------------------------------------------------------


def off_site(location: str, allowed_origins: set[str]) -> bool:
    """True when a browser would leave our site (or the allowed EHR origins) on this
    Location: what counts is how the WHATWG URL parser reads it, which drops tabs and
    newlines and treats a leading // or \\ as another host."""
    cleaned = "".join(c for c in location if c not in "\t\r\n").strip("\x00 \x01\x02\x1f")
    if cleaned.startswith("/") and not cleaned.startswith(("//", "/\\")):
        return False
    if cleaned.startswith("\\"):
        return True
    parts = urlsplit(cleaned.replace("\\", "/"))
    if not parts.scheme and not parts.netloc:
        return False  # a relative path
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return True
    return origin(cleaned) not in allowed_origins


# --- a SMART server that forges id_tokens -----------------------------------------------------

FORGE_PATH = "/r4/forge"


class ForgingEhr:
    """A SMART on FHIR server configured as a real integration's FHIR base, whose token
    endpoint answers with whatever id_token `mode` names. "valid" is the control: a token
    the gateway must accept, so a refusal in another mode is about that mode alone."""

    MODES = (
        "valid",
        "alg-none",
        "alg-hs256",
        "wrong-key",
        "unknown-kid",
        "wrong-aud",
        "wrong-iss",
        "expired",
        "not-yet-valid",
        "no-exp",
        "wrong-nonce",
        "no-nonce",
        "tampered-claims",
        "jku-header",
        "not-a-jwt",
    )

    def __init__(self, trap_url: str) -> None:
        self.trap_url = trap_url
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.mode = "valid"
        self.url = ""
        self._nonces: dict[str, str] = {}
        self.app = web.Application()
        self.app.router.add_get(f"{FORGE_PATH}/.well-known/smart-configuration", self._discovery)
        self.app.router.add_get("/authorize", self._authorize)
        self.app.router.add_post("/token", self._token)
        self.app.router.add_get("/jwks", self._jwks)
        self.app.router.add_get(FORGE_PATH + "/{tail:.*}", self._fhir)

    @property
    def fhir_base(self) -> str:
        return self.url + FORGE_PATH

    async def _discovery(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.fhir_base,
                "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token",
                "jwks_uri": f"{self.url}/jwks",
                "code_challenge_methods_supported": ["S256"],
                "capabilities": ["launch-ehr"],
            }
        )

    async def _authorize(self, request: web.Request) -> web.Response:
        code = secrets.token_urlsafe(16)
        self._nonces[code] = request.query.get("nonce", "")
        query = urlencode({"code": code, "state": request.query.get("state", "")})
        raise web.HTTPFound(f"{request.query['redirect_uri']}?{query}")

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        nonce = self._nonces.pop(str(form.get("code", "")), "")
        return web.json_response(
            {
                "access_token": "forged-access-token",
                "token_type": "Bearer",
                "expires_in": 570,
                "scope": "launch openid fhirUser",
                "patient": "4242",
                "id_token": self.id_token(nonce),
            }
        )

    async def _jwks(self, _: web.Request) -> web.Response:
        jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return web.json_response({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]})

    async def _fhir(self, _: web.Request) -> web.Response:
        return web.json_response({"resourceType": "Bundle", "type": "searchset", "entry": []})

    def id_token(self, nonce: str) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.fhir_base,
            "aud": SMART_CLIENT_ID,
            "sub": "1",
            "iat": now,
            "exp": now + 300,
            "nonce": nonce,
            "fhirUser": f"{self.fhir_base}/Practitioner/1",
        }
        key: Any = self.key
        headers: dict[str, Any] = {"kid": "k1"}
        algorithm = "RS256"
        mode = self.mode
        if mode == "alg-none":
            return jwt.encode(claims, "", algorithm="none")
        if mode == "alg-hs256":
            # The classic confusion: the public key used as an HMAC secret.
            public = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key())
            return jwt.encode(claims, public.encode(), algorithm="HS256", headers=headers)
        if mode == "not-a-jwt":
            return "not.a.jwt"
        if mode == "wrong-key":
            key = self.foreign
        elif mode == "unknown-kid":
            key, headers = self.foreign, {"kid": "k2"}
        elif mode == "jku-header":
            key, headers = self.foreign, {"kid": "evil", "jku": f"{self.trap_url}/jwks"}
        elif mode == "wrong-aud":
            claims["aud"] = "another-client"
        elif mode == "wrong-iss":
            claims["iss"] = f"{self.url}/r4/another-tenant"
        elif mode == "expired":
            claims |= {"iat": now - 7200, "exp": now - 3600}
        elif mode == "not-yet-valid":
            claims |= {"iat": now + 3600, "nbf": now + 3600, "exp": now + 7200}
        elif mode == "no-exp":
            del claims["exp"]
        elif mode == "wrong-nonce":
            claims["nonce"] = "a-nonce-from-another-sign-in"
        elif mode == "no-nonce":
            del claims["nonce"]
        token = jwt.encode(claims, key, algorithm=algorithm, headers=headers)
        if mode == "tampered-claims":
            header, _, signature = token.split(".")
            claims["fhirUser"] = f"{self.fhir_base}/Practitioner/2"
            body = jwt.utils.base64url_encode(orjson.dumps(claims)).decode()
            token = f"{header}.{body}.{signature}"
        return token


async def launch_through(
    http: aiohttp.ClientSession, gw: Gateway, ehr: ForgingEhr, integration_id: uuid.UUID
) -> aiohttp.ClientResponse:
    """A provider launch through `ehr`'s authorize; the callback's answer (body read)."""
    async with http.get(
        f"{gw.url}/launch/provider/{integration_id}",
        params={"iss": ehr.fhir_base, "launch": f"launch-{uuid.uuid4()}"},
        allow_redirects=False,
    ) as r:
        assert r.status == 302, await r.text()
        authorize = r.headers["Location"]
    async with http.get(authorize, allow_redirects=False) as r:
        callback = r.headers["Location"]
    async with http.get(callback, allow_redirects=False) as r:
        await r.read()
        return r


@pytest.fixture
async def forging_ehr(trap_url: str) -> AsyncIterator[ForgingEhr]:
    server = ForgingEhr(trap_url)
    async with running_app(server.app) as url:
        server.url = url
        yield server


class Trap:
    """A server that must never be called: any request to it is a leak."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.url = ""
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._hit)

    async def _hit(self, request: web.Request) -> web.Response:
        self.hits.append(str(request.rel_url))
        return web.json_response({})


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    server = Trap()
    async with running_app(server.app) as url:
        server.url = url
        yield server


@pytest.fixture
def trap_url(trap: Trap) -> str:
    return trap.url

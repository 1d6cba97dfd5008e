"""The launch gateway wired to both stand-ins, real Kafka and real Postgres."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from yarl import URL

from libs.common.events import IntegrationConfigV1, Topic, encode_event, make_event
from libs.common.kafka import ConsumerRunner
from libs.common.web import CONSUMERS
from sandbox.ehr import TENANT_A, RunningEhr, sign_webhook
from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.directory import CONTOSO_TENANT
from sandbox.tls import TlsFiles
from services.launch.settings import LaunchSettings

SMART_CLIENT_ID = "teams-connector-test"
SMART_CLIENT_SECRET = "smart-client-secret-for-tests"
WEBHOOK_SECRET = "scheduling-webhook-secret-for-tests"
ORGANIZER = "dr.lee@contosohealth.onmicrosoft.com"


@dataclass
class LaunchSystem:
    url: str
    notification_url: str
    settings: LaunchSettings
    app: web.Application
    ehr: RunningEhr
    microsoft: RunningSandbox
    integration_id: uuid.UUID
    fhir_base: str
    applied: dict[str, asyncio.Event] = field(default_factory=dict)

    @property
    def consumer(self) -> ConsumerRunner:
        return self.app[CONSUMERS][0]


@asynccontextmanager
async def serve_with_tls(
    app: web.Application, port: int, tls_port: int, tls: TlsFiles
) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.directory / "server.pem"), str(tls.directory / "server.key"))
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await web.TCPSite(runner, "127.0.0.1", tls_port, ssl_context=context).start()
    try:
        yield
    finally:
        await runner.cleanup()


def integration_config(
    settings: LaunchSettings,
    integration_id: uuid.UUID,
    fhir_base: str,
    *,
    version: int = 1,
    enabled: bool = True,
    sms_enabled: bool = True,
) -> IntegrationConfigV1:
    cipher = settings.field_cipher()
    return IntegrationConfigV1(
        integration_id=integration_id,
        config_version=version,
        fhir_base_url=fhir_base,
        environment="test",
        enabled=enabled,
        department="General Medicine",
        organisation_name="Contoso Health",
        ms_tenant_id=CONTOSO_TENANT,
        smart_client_id=SMART_CLIENT_ID,
        client_auth_method="client_secret_basic",
        client_secret_encrypted=cipher.encrypt(
            SMART_CLIENT_SECRET, f"integration-secret:{integration_id}"
        ),
        pkce_mode="required",
        teams_organizer_id=ORGANIZER,
        sms_enabled=sms_enabled,
        sms_from_number="+18005550100",
    )


async def publish_integration(
    producer: AIOKafkaProducer, prefix: str, tenant_id: str, config: IntegrationConfigV1
) -> None:
    event = make_event(Topic.INTEGRATION_CONFIG, tenant_id, str(config.integration_id), config)
    await producer.send_and_wait(
        prefix + Topic.INTEGRATION_CONFIG, encode_event(event), key=event.key.encode()
    )


async def register_in_ehr(http: aiohttp.ClientSession, system: LaunchSystem) -> None:
    """What the Cerner admin does with our integration record: register the app and point
    the scheduling feed at the gateway."""
    body = {
        "client_id": SMART_CLIENT_ID,
        "redirect_uris": [f"{system.url}/launch/callback"],
        "auth_method": "client_secret_basic",
        "client_secret": SMART_CLIENT_SECRET,
    }
    async with http.post(f"{system.ehr.url}/_sandbox/clients", json=body) as r:
        assert r.status in (200, 201), await r.text()
    patch = {
        "webhook_url": f"{system.url}/ehr/scheduling",
        "webhook_secret": WEBHOOK_SECRET,
        "launch_url": f"{system.url}/launch/provider/{system.integration_id}",
    }
    async with http.patch(f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}", json=patch) as r:
        assert r.status == 200, await r.text()


def scheduling_headers(raw: bytes) -> dict[str, str]:
    """The EHR's signature and tenant headers for a scheduling feed body, signed now."""
    return {
        "X-EHR-Signature": sign_webhook(WEBHOOK_SECRET, raw, int(time.time())),
        "X-EHR-Tenant": TENANT_A,
    }


def webhook_secrets() -> str:
    return orjson.dumps({"*": WEBHOOK_SECRET}).decode()


async def follow(
    http: aiohttp.ClientSession, url: str, cookies: dict[str, str] | None = None, limit: int = 10
) -> tuple[aiohttp.ClientResponse, str, dict[str, str]]:
    """Follows redirects by hand, as a browser would: (last response, its body, cookies).
    Cookies are kept per run, not per host, which is enough for these flows."""
    jar = dict(cookies or {})
    for _ in range(limit):
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())} if jar else {}
        async with http.get(url, allow_redirects=False, headers=headers) as response:
            body = await response.text()
            for name, morsel in response.cookies.items():
                jar[name] = morsel.value
            if response.status not in (301, 302, 303, 307):
                return response, body, jar
            url = str(response.url.join(URL(response.headers["Location"])))
    raise AssertionError(f"too many redirects from {url}")


def json_of(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))

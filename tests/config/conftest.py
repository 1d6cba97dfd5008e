"""A running config service wired to the Microsoft and EHR stand-ins, plus signed-in
sessions for the seeded Contoso and Fabrikam users."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from sandbox.ehr import TENANT_A, TENANT_B, RunningEhr
from sandbox.microsoft.app import RunningSandbox
from services.config.app import create_app
from services.config.settings import ConfigSettings
from tests.support.portal import PortalSession, allow_redirect_uri, portal_session
from tests.support.service_settings import config_test_settings

CONTOSO_ADMIN = "admin@contosohealth.onmicrosoft.com"
CONTOSO_READER = "reader@contosohealth.onmicrosoft.com"
CONTOSO_REPORTS = "reports@contosohealth.onmicrosoft.com"
FABRIKAM_ADMIN = "admin@fabrikamclinics.onmicrosoft.com"
CONTOSO_ADMIN_OID = "11111111-aaaa-4aaa-8aaa-000000000001"

Serve = Callable[[web.Application], AbstractAsyncContextManager[str]]


@dataclass
class ConfigPortal:
    url: str
    settings: ConfigSettings
    http: aiohttp.ClientSession
    ehr: RunningEhr
    microsoft: RunningSandbox
    app: web.Application
    sessions: dict[str, PortalSession] = field(default_factory=dict)

    async def session(self, upn: str) -> PortalSession:
        if upn not in self.sessions:
            self.sessions[upn] = await portal_session(self.http, self.url, upn)
        return self.sessions[upn]

    async def call(
        self,
        upn: str | None,
        method: str,
        path: str,
        body: Any = None,
        *,
        csrf: bool = True,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent: dict[str, str] = {}
        if upn is not None:
            session = await self.session(upn)
            sent = session.headers() if csrf else {"Cookie": f"portal_session={session.cookie}"}
        sent.update(headers or {})
        async with self.http.request(
            method, f"{self.url}{path}", json=body, headers=sent, allow_redirects=False
        ) as response:
            text = await response.text()
            is_json = response.content_type == "application/json" and text
            return response.status, (await response.json() if is_json else text)

    def fhir_base(self, tenant: str = TENANT_A) -> str:
        return self.ehr.fhir_base(tenant)

    def integration(self, tenant: str = TENANT_A, **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "fhir_base_url": self.fhir_base(tenant),
            "environment": "test" if tenant == TENANT_A else "production",
            "smart_client_id": "teams-connector",
            "client_auth_method": "client_secret_basic",
            "client_secret": "s3cret-from-code-console",
            "pkce_mode": "required",
            "teams_organizer_id": "dr.lee@contosohealth.onmicrosoft.com",
            "department": "Cardiology",
            "organisation_name": "Contoso Health",
        }
        body.update(overrides)
        return body


@pytest.fixture
def config_settings(
    make_settings: Callable[..., Any],
    microsoft: RunningSandbox,
    ca_bundle: str,
) -> ConfigSettings:
    return config_test_settings(make_settings, microsoft, ca_bundle)


@asynccontextmanager
async def running_portal(
    settings: ConfigSettings,
    serve: Serve,
    http: aiohttp.ClientSession,
    ehr: RunningEhr,
    microsoft: RunningSandbox,
) -> AsyncIterator[ConfigPortal]:
    app = create_app(settings)
    async with serve(app) as url:
        yield ConfigPortal(url, settings, http, ehr, microsoft, app)


@pytest.fixture
async def config_portal(
    config_settings: ConfigSettings,
    serve: Serve,
    microsoft: RunningSandbox,
    microsoft_http: aiohttp.ClientSession,
    ehr: RunningEhr,
) -> AsyncIterator[ConfigPortal]:
    await allow_redirect_uri(microsoft_http, microsoft, config_settings.redirect_uri)
    async with running_portal(config_settings, serve, microsoft_http, ehr, microsoft) as portal:
        yield portal


async def table_counts(settings: ConfigSettings) -> dict[str, int]:
    """Rows in the tables a refused request must not touch."""
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(), server_settings={"search_path": "config"}
    )
    try:
        return {
            table: int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            for table in ("integrations", "outbox", "audit_log", "phone_numbers")
        }
    finally:
        await conn.close()


__all__ = ["TENANT_A", "TENANT_B"]

"""A running analytics service signed in to through the Microsoft stand-in, with direct
access to its facts for seeding."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from libs.common.web import SETTINGS
from sandbox.microsoft.app import RunningSandbox
from services.analytics.app import create_app
from services.analytics.settings import AnalyticsSettings
from tests.analytics.support import Facts
from tests.support.portal import PortalSession, allow_redirect_uri, portal_session
from tests.support.service_settings import analytics_test_settings

CONTOSO_ADMIN = "admin@contosohealth.onmicrosoft.com"
CONTOSO_READER = "reader@contosohealth.onmicrosoft.com"
CONTOSO_REPORTS = "reports@contosohealth.onmicrosoft.com"
FABRIKAM_ADMIN = "admin@fabrikamclinics.onmicrosoft.com"

Serve = Callable[[web.Application], AbstractAsyncContextManager[str]]


@dataclass
class Analytics:
    url: str
    app: web.Application
    facts: Facts
    http: aiohttp.ClientSession
    sessions: dict[str, PortalSession] = field(default_factory=dict)

    def local_noon(self) -> datetime:
        """Noon today in the report time zone: the reports' today, and the same date in UTC
        (where the seeded visits' bookings are)."""
        settings = self.app[SETTINGS]
        assert isinstance(settings, AnalyticsSettings)
        zone = settings.report_zone
        return datetime.combine(datetime.now(zone).date(), time(12), zone)

    async def session(self, upn: str) -> PortalSession:
        if upn not in self.sessions:
            self.sessions[upn] = await portal_session(self.http, self.url, upn)
        return self.sessions[upn]

    async def get(
        self, upn: str | None, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        sent = dict(headers or {})
        if upn is not None:
            sent["Cookie"] = f"portal_session={(await self.session(upn)).cookie}"
        async with self.http.get(
            f"{self.url}{path}", headers=sent, allow_redirects=False
        ) as response:
            text = await response.text()
            body = await response.json() if response.content_type == "application/json" else text
            return response.status, body, response


@pytest.fixture
def analytics_settings(
    make_settings: Callable[..., Any], microsoft: RunningSandbox, ca_bundle: str
) -> AnalyticsSettings:
    return analytics_test_settings(make_settings, microsoft, ca_bundle)


@pytest.fixture
async def analytics(
    analytics_settings: AnalyticsSettings,
    serve: Serve,
    microsoft: RunningSandbox,
    microsoft_http: aiohttp.ClientSession,
    database_url: str,
) -> AsyncIterator[Analytics]:
    await allow_redirect_uri(microsoft_http, microsoft, analytics_settings.redirect_uri)
    app = create_app(analytics_settings)
    async with serve(app) as url:
        facts = await Facts.open(database_url)
        try:
            yield Analytics(url, app, facts, microsoft_http)
        finally:
            await facts.close()

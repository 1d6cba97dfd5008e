from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from libs.common.events import AppointmentCreatedV1, decode_event
from libs.common.web import CONSUMERS
from services.analytics.app import create_app as analytics_app
from services.analytics.settings import AnalyticsSettings
from services.config.app import create_app as config_app
from services.config.settings import ConfigSettings
from services.launch.app import create_app as launch_app
from services.launch.settings import LaunchSettings
from services.notify.app import create_app as notify_app
from services.notify.settings import NotifySettings
from tests.conftest import wait_for
from tests.support.kafka_reader import read_all

TOKEN = "test-scheduling-token"
BOOKING = {
    "tenant_id": "tenant-a",
    "integration_id": "4b0b3b0e-6c1a-4a43-9c39-1b0c4f1f2a11",
    "fhir_appointment_id": "4711",
    "environment": "production",
    "department": "Cardiology",
    "starts_at": "2026-11-25T15:00:00Z",
    "ends_at": "2026-11-25T15:30:00Z",
    "time_zone": "America/Chicago",
}

Serve = Callable[[web.Application], AbstractAsyncContextManager[str]]


class System:
    def __init__(self, urls: dict[str, str], apps: dict[str, web.Application]) -> None:
        self.urls = urls
        self.apps = apps
        self.applied: dict[str, asyncio.Event] = {}
        for name in ("notify", "analytics"):
            self.applied[name] = asyncio.Event()
            for runner in apps[name][CONSUMERS]:
                runner.observe(self._observer(name))

    def _observer(self, name: str) -> Callable[[list[tuple[str, str, bool]]], None]:
        def seen(outcomes: list[tuple[str, str, bool]]) -> None:
            if any(applied for _, _, applied in outcomes):
                self.applied[name].set()

        return seen


@pytest.fixture
async def system(make_settings: Callable[..., Any], serve: Serve) -> AsyncIterator[System]:
    apps = {
        "config": config_app(make_settings(ConfigSettings)),
        "launch": launch_app(make_settings(LaunchSettings, scheduling_api_token=TOKEN)),
        "notify": notify_app(make_settings(NotifySettings)),
        "analytics": analytics_app(make_settings(AnalyticsSettings)),
    }
    async with AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(serve(app)) for name, app in apps.items()}
        yield System(urls, apps)


async def test_booking_flows_from_launch_to_notify_and_analytics_exactly_once(
    system: System, database_url: str, topic_prefix: str
) -> None:
    """A booked appointment becomes a launch row, one appointment-created event, and one row
    in notify's and analytics' own tables; booking it again changes nothing."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{system.urls['launch']}/internal/appointments", json=BOOKING, headers=headers
        ) as r:
            assert r.status == 201
            key = (await r.json())["appointment_key"]
        await wait_for(system.applied["notify"], "notify to apply appointment-created")
        await wait_for(system.applied["analytics"], "analytics to apply appointment-created")
        async with http.post(
            f"{system.urls['launch']}/internal/appointments", json=BOOKING, headers=headers
        ) as r:
            assert r.status == 200
            assert (await r.json()) == {"appointment_key": key, "created": False}

    published = await read_all(topic_prefix + "appointment-created", expect=1)
    assert len(published) == 1
    event = decode_event(published[0])
    assert event.key == key
    assert event.tenant_id == "tenant-a"
    assert isinstance(event.payload, AppointmentCreatedV1)
    assert event.payload.department == "Cardiology"

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM launch.appointments") == 1
        assert (
            await conn.fetchval("SELECT count(*) FROM launch.outbox WHERE published_at IS NOT NULL")
            == 1
        )
        notify_row = await conn.fetchrow("SELECT * FROM notify.appointments")
        assert notify_row is not None
        assert notify_row["appointment_key"] == key
        assert notify_row["confirmation"] == "skipped"  # SMS is off for this integration
        fact = await conn.fetchrow("SELECT * FROM analytics.appointment_facts")
        assert fact is not None
        assert (fact["appointment_key"], fact["department"], fact["environment"]) == (
            key,
            "Cardiology",
            "production",
        )
        assert await conn.fetchval("SELECT count(*) FROM notify.inbox") == 1
        assert await conn.fetchval("SELECT count(*) FROM analytics.inbox") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("change", "problem_field"),
    [
        ({"environment": "staging"}, "environment"),
        ({"ends_at": "2026-11-25T14:00:00Z"}, ""),
        ({"time_zone": "Mars/Olympus"}, ""),
        ({"starts_at": "2026-11-25T15:00:00"}, "starts_at"),
        ({"fhir_appointment_id": "../../etc"}, "fhir_appointment_id"),
        ({"patient_name": "Jane Doe"}, "patient_name"),
    ],
)
async def test_invalid_booking_is_refused_with_422_and_changes_nothing(
    system: System, database_url: str, change: dict[str, str], problem_field: str
) -> None:
    """Hostile or malformed bookings get a clear 422 naming the field; nothing is written."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{system.urls['launch']}/internal/appointments",
            json={**BOOKING, **change},
            headers=headers,
        ) as r,
    ):
        assert r.status == 422
        body = await r.json()
    assert body["error"] == "invalid appointment"
    assert any(p["field"] == problem_field for p in body["problems"])
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM launch.appointments") == 0
        assert await conn.fetchval("SELECT count(*) FROM launch.outbox") == 0
    finally:
        await conn.close()


async def test_booking_without_the_token_is_refused(system: System) -> None:
    """The scheduling ingress answers 401 to a caller without the bearer token."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{system.urls['launch']}/internal/appointments", json=BOOKING) as r,
    ):
        assert r.status == 401


async def test_every_service_reports_health_readiness_and_metrics(system: System) -> None:
    """Each service answers /healthz, /readyz (Postgres and Kafka checked) and /metrics."""
    async with aiohttp.ClientSession() as http:
        for name, url in system.urls.items():
            async with http.get(f"{url}/healthz") as r:
                assert r.status == 200, name
            async with http.get(f"{url}/readyz") as r:
                body = await r.json()
                assert r.status == 200, (name, body)
                assert body["checks"]["postgres"] == "ok"
                assert body["checks"]["kafka"] == "ok"
            async with http.get(f"{url}/metrics") as r:
                assert r.status == 200
                assert "http_requests_total" in await r.text()

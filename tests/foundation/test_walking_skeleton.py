from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
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
from services.notify.app import create_app as notify_app
from services.notify.settings import NotifySettings
from tests.conftest import wait_for
from tests.launch.test_visit_end_to_end import book_video_visit
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem

Serve = Callable[[web.Application], AbstractAsyncContextManager[str]]


class Applied:
    """Set once a service's consumers applied an appointment-created event."""

    def __init__(self, apps: dict[str, web.Application]) -> None:
        self.events: dict[str, asyncio.Event] = {}
        for name, app in apps.items():
            event = self.events[name] = asyncio.Event()
            for runner in app[CONSUMERS]:
                runner.observe(self._observer(event))

    @staticmethod
    def _observer(event: asyncio.Event) -> Callable[[list[tuple[str, str, bool]]], None]:
        def seen(outcomes: list[tuple[str, str, bool]]) -> None:
            if any(topic == "appointment-created" and applied for topic, _, applied in outcomes):
                event.set()

        return seen


@dataclass
class Others:
    urls: dict[str, str]
    applied: Applied


@pytest.fixture
async def others(
    make_settings: Callable[..., Any], serve: Serve, ca_bundle: str
) -> AsyncIterator[Others]:
    apps = {
        "config": config_app(make_settings(ConfigSettings)),
        "notify": notify_app(make_settings(NotifySettings, tls_ca_bundle=ca_bundle)),
        "analytics": analytics_app(make_settings(AnalyticsSettings)),
    }
    async with AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(serve(app)) for name, app in apps.items()}
        yield Others(urls, Applied({k: apps[k] for k in ("notify", "analytics")}))


async def test_booking_flows_from_launch_to_notify_and_analytics_exactly_once(
    launch_system: LaunchSystem, others: Others, database_url: str, topic_prefix: str
) -> None:
    """A booking from the EHR becomes one launch row, one appointment-created event, and one
    row in notify's and analytics' own tables, each applied once."""
    applied = others.applied
    async with aiohttp.ClientSession() as http:
        await book_video_visit(http, launch_system)
    await wait_for(applied.events["notify"], "notify to apply appointment-created")
    await wait_for(applied.events["analytics"], "analytics to apply appointment-created")

    published = await read_all(topic_prefix + "appointment-created", expect=1)
    assert len(published) == 1
    event = decode_event(published[0])
    assert isinstance(event.payload, AppointmentCreatedV1)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM launch.appointments") == 1
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM notify.inbox WHERE topic = 'appointment-created'"
            )
            == 1
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM analytics.inbox WHERE topic = 'appointment-created'"
            )
            == 1
        )
    finally:
        await conn.close()


async def test_every_service_reports_health_readiness_and_metrics(
    launch_system: LaunchSystem, others: Others
) -> None:
    """Each service answers /healthz, /readyz (Postgres and Kafka checked) and /metrics."""
    urls = {"launch": launch_system.url, **others.urls}
    async with aiohttp.ClientSession() as http:
        for name, url in urls.items():
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

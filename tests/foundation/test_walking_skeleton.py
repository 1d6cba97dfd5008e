from __future__ import annotations

import aiohttp
import asyncpg

from libs.common.events import AppointmentCreatedV1, decode_event
from tests.conftest import metrics_url, wait_for
from tests.launch.test_visit_end_to_end import book_video_visit
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem
from tests.support.other_services import Others


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
    """Each service answers /healthz and /readyz (Postgres and Kafka checked) on its port, and
    /metrics on its metrics port."""
    urls = {"launch": launch_system.url, **others.urls}
    apps = {"launch": launch_system.app, **others.apps}
    async with aiohttp.ClientSession() as http:
        for name, url in urls.items():
            async with http.get(f"{url}/healthz") as r:
                assert r.status == 200, name
            async with http.get(f"{url}/readyz") as r:
                body = await r.json()
                assert r.status == 200, (name, body)
                assert body["checks"]["postgres"] == "ok"
                assert body["checks"]["kafka"] == "ok"
            async with http.get(metrics_url(apps[name])) as r:
                assert r.status == 200, name
                assert "http_requests_total" in await r.text()

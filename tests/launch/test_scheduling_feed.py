from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import orjson

from libs.common.events import (
    AppointmentCancelledV1,
    AppointmentCreatedV1,
    AppointmentRescheduledV1,
    SmsRequestedV1,
    decode_event,
)
from libs.common.web import DB_POOL
from sandbox.ehr import TENANT_A
from services.launch.integrations import IntegrationDirectory
from services.launch.smart import SmartClient
from tests.launch.test_visit_end_to_end import book_video_visit, launch_from_ehr
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem, follow


async def test_reschedule_and_cancel_publish_their_events_and_close_the_link(
    launch_system: LaunchSystem, topic_prefix: str, database_url: str
) -> None:
    """Moving an appointment publishes appointment-rescheduled with the new time and a higher
    schedule version; cancelling publishes appointment-cancelled and the join link stops."""
    system = launch_system
    base = f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/appointments"
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system)
        created = decode_event((await read_all(topic_prefix + "appointment-created", expect=1))[0])
        assert isinstance(created.payload, AppointmentCreatedV1)
        new_start = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
        async with http.post(
            f"{base}/{appointment['id']}/reschedule",
            json={"start": new_start.isoformat(), "minutes": 45},
        ) as r:
            assert r.status == 200, await r.text()
        moved = await read_all(topic_prefix + "appointment-rescheduled", expect=1)
        assert len(moved) == 1
        reschedule = decode_event(moved[0])
        assert reschedule.key == created.key
        assert isinstance(reschedule.payload, AppointmentRescheduledV1)
        assert reschedule.payload.starts_at == new_start
        assert reschedule.payload.ends_at == new_start + timedelta(minutes=45)
        assert reschedule.payload.schedule_version > created.payload.schedule_version

        async with http.post(f"{base}/{appointment['id']}/cancel", json={}) as r:
            assert r.status == 200, await r.text()
        cancelled = await read_all(topic_prefix + "appointment-cancelled", expect=1)
        assert len(cancelled) == 1
        cancel = decode_event(cancelled[0])
        assert isinstance(cancel.payload, AppointmentCancelledV1)
        assert cancel.payload.schedule_version > reschedule.payload.schedule_version

        assert created.payload.join_url is not None
        async with http.get(created.payload.join_url) as r:
            assert r.status == 410
            assert "cancelled" in await r.text()
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT status, starts_at FROM launch.appointments")
        assert row is not None
        assert row["status"] == "cancelled"
        assert row["starts_at"] == new_start
    finally:
        await conn.close()


async def test_send_link_asks_notify_through_an_event(
    launch_system: LaunchSystem, topic_prefix: str
) -> None:
    """ "Send link to patient" publishes sms-requested (no phone, no text); without the form's
    CSRF token it is refused."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system)
        await read_all(topic_prefix + "appointment-created", expect=1)
        status, body, cookies = await launch_from_ehr(http, system, appointment["id"])
        assert status == 200
        csrf = body.split('name="csrf_token" value="')[1].split('"')[0]
        cookie = {"Cookie": f"provider_session={cookies['provider_session']}"}
        async with http.post(
            f"{system.url}/visit/send-link",
            data={"csrf_token": "wrong"},
            headers=cookie,
            allow_redirects=False,
        ) as r:
            assert r.status == 403
        async with http.post(
            f"{system.url}/visit/send-link",
            data={"csrf_token": csrf},
            headers=cookie,
            allow_redirects=False,
        ) as r:
            assert r.status == 303
    requested = await read_all(topic_prefix + "sms-requested", expect=1)
    assert len(requested) == 1
    event = decode_event(requested[0])
    assert isinstance(event.payload, SmsRequestedV1)
    assert event.payload.integration_id == system.integration_id


async def test_refresh_without_a_new_refresh_token_keeps_the_old_one(
    launch_system: LaunchSystem,
) -> None:
    """Cerner may omit refresh_token on refresh; the client keeps the one it had."""
    system = launch_system
    integration = await IntegrationDirectory(system.app[DB_POOL]).by_id(system.integration_id)
    assert integration is not None
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system)
        async with http.post(
            f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/launches",
            json={"appointment": appointment["id"]},
        ) as r:
            launch_url = (await r.json())["launch_url"]
        response, _, _ = await follow(http, launch_url)
        assert response.status == 200
        conn_tokens = await system.app[DB_POOL].fetchval(
            "SELECT smart_tokens FROM provider_sessions"
        )
        tokens = orjson.loads(
            system.settings.field_cipher().decrypt(
                conn_tokens, f"provider-session:{system.integration_id}"
            )
        )
        assert tokens["refresh_token"]
        smart = SmartClient(http, system.settings)
        config = await smart.discover(system.fhir_base)
        fresh = await smart.refresh(
            integration, config, system.settings.field_cipher(), tokens["refresh_token"]
        )
        assert fresh.access_token != tokens["access_token"]
        assert fresh.refresh_token == tokens["refresh_token"]

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer
from yarl import URL

from libs.common.events import AppointmentCreatedV1, Envelope, decode_event
from libs.common.web import DB_POOL
from sandbox.ehr import TENANT_A
from services.launch.meeting_preparation import prepare_due, prepare_meeting
from services.launch.state import INTEGRATIONS
from tests.conftest import wait_for
from tests.hostile.test_webhook_forgery import scheduling_event
from tests.launch.test_visit_end_to_end import book_video_visit, launch_from_ehr
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import (
    LaunchSystem,
    integration_config,
    publish_integration,
    scheduling_headers,
)

UNKNOWN_ORGANIZER = "nobody@contosohealth.onmicrosoft.com"


async def _book(http: aiohttp.ClientSession, system: LaunchSystem, starts_in: timedelta) -> str:
    return str((await book_video_visit(http, system, starts_in))["id"])


async def _created(topic_prefix: str, expect: int) -> list[Envelope[AppointmentCreatedV1]]:
    events = [
        decode_event(raw)
        for raw in await read_all(topic_prefix + "appointment-created", expect=expect)
    ]
    assert len(events) == expect
    for event in events:
        assert isinstance(event.payload, AppointmentCreatedV1)
    return events


async def _meeting_of(system: LaunchSystem, key: str) -> dict[str, Any]:
    row = await system.app[DB_POOL].fetchrow(
        "SELECT meeting_id, patient_join_url, subscription_id, meeting_attempts,"
        " meeting_retry_at > now() AS retry_later FROM appointments WHERE appointment_key = $1",
        key,
    )
    assert row is not None
    return dict(row)


async def _teams_meetings(system: LaunchSystem, http: aiohttp.ClientSession) -> list[Any]:
    async with http.get(f"{system.microsoft.base_url}/_sandbox/meetings") as r:
        meetings: list[Any] = await r.json()
    return meetings


async def _set_organizer(
    system: LaunchSystem,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    organizer: str,
    version: int,
) -> None:
    applied = asyncio.Event()
    system.consumer.observe(lambda outcomes: applied.set() if outcomes else None)
    config = integration_config(system.settings, system.integration_id, system.fhir_base)
    changed = config.model_copy(update={"teams_organizer_id": organizer, "config_version": version})
    await publish_integration(producer, topic_prefix, "contoso", changed)
    await wait_for(applied, f"the gateway to apply integration version {version}")
    # This replica's lookups are cached for a few seconds; the change is in Postgres now.
    system.app[INTEGRATIONS].invalidate()


async def test_worker_prepares_meetings_due_within_the_lead_time_only(
    launch_system: LaunchSystem, topic_prefix: str, microsoft_http: aiohttp.ClientSession
) -> None:
    """A booking is recorded without a meeting; the worker prepares the meeting of a visit
    starting within the lead time (once, with its subscription) and leaves a visit weeks
    ahead alone."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        await _book(http, system, timedelta(minutes=30))
        await _book(http, system, timedelta(days=20))
    soon, later = sorted(await _created(topic_prefix, 2), key=lambda e: e.payload.starts_at)
    await prepare_due(system.app)
    # The background worker may have taken the visit first; waiting on its row lock, this
    # call then finds the meeting made and makes no second one.
    assert await prepare_meeting(system.app, soon.key) == "ready"
    prepared = await _meeting_of(system, soon.key)
    assert prepared["meeting_id"]
    assert prepared["patient_join_url"]
    assert prepared["subscription_id"]
    assert (await _meeting_of(system, later.key))["meeting_id"] is None
    meetings = await _teams_meetings(system, microsoft_http)
    assert [m["externalId"] for m in meetings] == [soon.key]


async def test_provider_launch_prepares_a_meeting_not_yet_prepared(
    launch_system: LaunchSystem, topic_prefix: str, microsoft_http: aiohttp.ClientSession
) -> None:
    """A clinician launching a visit booked weeks ahead gets its meeting at once."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment = await _book(http, system, timedelta(days=20))
        (created,) = await _created(topic_prefix, 1)
        assert (await _meeting_of(system, created.key))["meeting_id"] is None
        status, page, _ = await launch_from_ehr(http, system, appointment)
    assert status == 200, page
    assert "Join the meeting" in page
    assert (await _meeting_of(system, created.key))["meeting_id"]
    assert len(await _teams_meetings(system, microsoft_http)) == 1


async def test_booking_and_confirmation_do_not_wait_for_graph(
    launch_system: LaunchSystem,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """While Graph refuses the integration's organizer, a booking is still recorded with
    its appointment-created (join link, SMS on); the meeting is retried later, the patient's
    Join says the visit is not ready, and once Graph accepts, Join prepares the meeting and
    sends the patient to Teams."""
    system = launch_system
    await _set_organizer(system, producer, topic_prefix, UNKNOWN_ORGANIZER, version=2)
    async with aiohttp.ClientSession() as http:
        await _book(http, system, timedelta(minutes=30))
        (created,) = await _created(topic_prefix, 1)
        assert created.payload.join_url
        assert created.payload.sms_enabled
        assert await prepare_meeting(system.app, created.key) == "failed"
        failed = await _meeting_of(system, created.key)
        assert failed["meeting_id"] is None
        assert failed["meeting_attempts"] >= 1
        assert failed["retry_later"]
        enter = created.payload.join_url + "/enter"
        async with http.get(enter, allow_redirects=False) as r:
            assert r.status == 503
            assert "not ready yet" in await r.text()

        await _set_organizer(system, producer, topic_prefix, integration_organizer(system), 3)
        async with http.get(enter, allow_redirects=False) as r:
            assert r.status == 303
            location = r.headers["Location"]
    prepared = await _meeting_of(system, created.key)
    assert URL(prepared["patient_join_url"]) == URL(location)
    assert [m["externalId"] for m in await _teams_meetings(system, microsoft_http)] == [created.key]


def integration_organizer(system: LaunchSystem) -> str:
    config = integration_config(system.settings, system.integration_id, system.fhir_base)
    return config.teams_organizer_id


async def test_a_cancelled_visit_gets_no_meeting(
    launch_system: LaunchSystem, topic_prefix: str, microsoft_http: aiohttp.ClientSession
) -> None:
    """A visit cancelled before its meeting was prepared is never prepared."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment = await _book(http, system, timedelta(days=20))
        (created,) = await _created(topic_prefix, 1)
        base = f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/appointments"
        async with http.post(f"{base}/{appointment}/cancel", json={}) as r:
            assert r.status == 200, await r.text()
        await read_all(topic_prefix + "appointment-cancelled", expect=1)
    assert await prepare_meeting(system.app, created.key) == "not bookable"
    assert await _teams_meetings(system, microsoft_http) == []


async def test_a_booking_delivered_twice_or_resent_is_recorded_once(
    launch_system: LaunchSystem,
) -> None:
    """The same signed delivery twice is a duplicate; the booking re-sent under a new event id
    is already known; either way one appointment and one appointment-created."""
    system = launch_system
    base = f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}"
    async with aiohttp.ClientSession() as http:
        async with http.patch(base, json={"webhook_url": None}) as r:
            assert r.status == 200, await r.text()
        fhir_appointment = await book_video_visit(http, system, timedelta(hours=3))

        async def deliver(body: bytes) -> str:
            headers = {"Content-Type": "application/json", **scheduling_headers(body)}
            async with http.post(f"{system.url}/ehr/scheduling", data=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                return str((await r.json())["status"])

        booking = scheduling_event(fhir_appointment, "booked", TENANT_A, system.fhir_base, False)
        resent = scheduling_event(fhir_appointment, "booked", TENANT_A, system.fhir_base, False)
        assert [await deliver(booking), await deliver(booking), await deliver(resent)] == [
            "booked",
            "duplicate",
            "already known",
        ]
    pool = system.app[DB_POOL]
    assert await pool.fetchval("SELECT count(*) FROM appointments") == 1
    assert await pool.fetchval("SELECT count(*) FROM scheduling_deliveries") == 2
    created = "SELECT count(*) FROM outbox WHERE topic = 'appointment-created'"
    assert await pool.fetchval(created) == 1

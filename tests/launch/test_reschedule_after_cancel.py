"""A cancelled visit stays cancelled: a reschedule that arrives after the cancel, whatever its
schedule version, changes nothing, publishes nothing and is answered as such."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from libs.common.events import AppointmentCreatedV1, decode_event
from libs.common.web import DB_POOL
from sandbox.ehr import TENANT_A
from tests.hostile.test_webhook_forgery import scheduling_event
from tests.launch.test_visit_end_to_end import book_video_visit
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem, scheduling_headers


async def _deliver(http: aiohttp.ClientSession, system: LaunchSystem, body: bytes) -> str:
    """Posts a signed feed event as the EHR would; the gateway's status answer."""
    headers = {"Content-Type": "application/json", **scheduling_headers(body)}
    async with http.post(f"{system.url}/ehr/scheduling", data=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["status"])


def _moved(appointment: dict[str, Any], start: datetime, version: int) -> dict[str, Any]:
    """The appointment as a `rescheduled` event would carry it: booked, at `start` for 30
    minutes, with the EHR's version `version`."""
    return {
        **appointment,
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=30)).isoformat(),
        "meta": {"versionId": str(version - 1)},  # scheduling_event adds one
    }


async def test_a_reschedule_after_a_cancel_changes_nothing_and_publishes_nothing(
    launch_system: LaunchSystem, topic_prefix: str
) -> None:
    """A newer reschedule of a cancelled visit is answered "ignored: cancelled" and leaves the
    row as the cancel left it (status, times, version, no meeting move); an older one gets the
    same answer, a redelivery "duplicate"; no appointment-rescheduled, and the link still says
    the visit was cancelled."""
    system = launch_system
    pool = system.app[DB_POOL]
    base = f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/appointments"
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system, timedelta(hours=2))
        (raw,) = await read_all(topic_prefix + "appointment-created", expect=1)
        created = decode_event(raw).payload
        assert isinstance(created, AppointmentCreatedV1)
        async with http.post(f"{base}/{appointment['id']}/cancel", json={}) as r:
            assert r.status == 200, await r.text()
        await read_all(topic_prefix + "appointment-cancelled", expect=1)
        before = await pool.fetchrow(
            "SELECT status, starts_at, ends_at, schedule_version, meeting_times_stale, updated_at"
            " FROM appointments"
        )
        assert before is not None
        assert before["status"] == "cancelled"

        later = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
        newer = scheduling_event(
            _moved(appointment, later, before["schedule_version"] + 5),
            "rescheduled",
            TENANT_A,
            system.fhir_base,
        )
        older = scheduling_event(
            _moved(appointment, later, 1), "rescheduled", TENANT_A, system.fhir_base
        )
        assert [
            await _deliver(http, system, newer),
            await _deliver(http, system, newer),
            await _deliver(http, system, older),
        ] == ["ignored: cancelled", "duplicate", "ignored: cancelled"]

        assert created.join_url is not None
        async with http.get(created.join_url) as r:
            assert r.status == 410
            assert "cancelled" in await r.text()
    after = await pool.fetchrow(
        "SELECT status, starts_at, ends_at, schedule_version, meeting_times_stale, updated_at"
        " FROM appointments"
    )
    assert after == before
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE topic = $1", "appointment-rescheduled"
        )
        == 0
    )
    # Both events are recorded as delivered: the EHR's retries are answered "duplicate".
    assert await pool.fetchval("SELECT count(*) FROM scheduling_deliveries") == 4


async def test_a_reschedule_of_a_booked_visit_still_moves_it(
    launch_system: LaunchSystem, topic_prefix: str
) -> None:
    """The same delivered directly for a booked visit moves it and publishes
    appointment-rescheduled; an older version after it is "stale"."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system, timedelta(hours=2))
        await read_all(topic_prefix + "appointment-created", expect=1)
        later = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
        newer = scheduling_event(
            _moved(appointment, later, 3), "rescheduled", TENANT_A, system.fhir_base
        )
        older = scheduling_event(
            _moved(appointment, later, 2), "rescheduled", TENANT_A, system.fhir_base
        )
        assert [await _deliver(http, system, newer), await _deliver(http, system, older)] == [
            "rescheduled",
            "stale",
        ]
        assert len(await read_all(topic_prefix + "appointment-rescheduled", expect=1)) == 1
    row = await system.app[DB_POOL].fetchrow(
        "SELECT status, starts_at, schedule_version FROM appointments"
    )
    assert row is not None
    assert (row["status"], row["starts_at"], row["schedule_version"]) == ("booked", later, 3)

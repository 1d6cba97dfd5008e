"""Graph is .NET: its DateTime.MinValue and MaxValue are valid ISO times. Found by a review:
carried into events, asyncpg stored them as -infinity and infinity and read them back naive,
and a year-1 time left the calendar once a visit's zone shifted it, so analytics dead-lettered
the visit's events. Events now carry only times of the years 1970 to 8999; launch refuses a
call event with such a time (400, as one UTC cannot hold) and drops such a report interval."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import aiohttp
from pydantic import SecretStr

from sandbox.ehr import TENANT_A
from services.launch.meeting_preparation import prepare_meeting
from services.launch.notifications import _intervals_from_reports
from tests.hostile.attack_support import Gateway, gateway, module_infra
from tests.hostile.test_webhook_forgery import book_in_ehr, notification

__all__ = ["gateway", "module_infra"]

MIN_VALUE = "0001-01-01T00:00:00Z"
MAX_VALUE = "9999-12-31T23:59:59.9999999Z"


async def test_a_call_event_at_the_end_of_dotnets_calendar_is_refused(
    gateway: Gateway, microsoft_http: aiohttp.ClientSession
) -> None:
    """A genuine notification (its clientState right) whose eventDateTime is MinValue or
    MaxValue gets a 400 and changes nothing, as one UTC cannot hold does; the same
    notification with a usable time is then applied."""
    gw = gateway
    async with aiohttp.ClientSession() as http:
        visit = await book_in_ehr(http, gw, TENANT_A)
    assert await prepare_meeting(gw.system.app, visit["key"]) in ("ready", "prepared")
    subscription = str(
        await gw.fetchval(
            "SELECT subscription_id FROM appointments WHERE appointment_key = $1", visit["key"]
        )
    )
    state = gw.system.microsoft.components.graph.subscriptions[subscription].client_state
    url = f"{gw.system.notification_url}/graph/notifications"
    before = await gw.counts()
    note: dict[str, Any] = notification(subscription, state, "leg-edge")
    for edge in (MIN_VALUE, MAX_VALUE):
        note["resourceData"]["eventDateTime"] = edge
        async with microsoft_http.post(url, json={"value": [note]}) as r:
            assert r.status == 400, await r.text()
    assert await gw.counts() == before
    note["resourceData"]["eventDateTime"] = datetime.now(UTC).isoformat()
    async with microsoft_http.post(url, json={"value": [note]}) as r:
        assert r.status == 202, await r.text()
    assert await gw.fetchval("SELECT count(*) FROM roster") == before["roster"] + 1


def test_a_report_interval_at_the_end_of_dotnets_calendar_is_dropped() -> None:
    """An attendance interval joined at MinValue is dropped and one left at MaxValue is kept
    as still present; a participant with no usable interval is left out of the report's
    attendance, so the meeting's end takes their roster times instead of none at all."""
    settings: Any = SimpleNamespace(join_token_secret=SecretStr("x" * 32))
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    report = {
        "meetingStartDateTime": now,
        "attendanceRecords": [
            {
                "identity": {"id": "dr-1"},
                "attendanceIntervals": [
                    {"joinDateTime": MIN_VALUE, "leaveDateTime": now},
                    {"joinDateTime": now, "leaveDateTime": MAX_VALUE},
                    {"joinDateTime": now, "leaveDateTime": now},
                ],
            },
            {
                "identity": {"id": "pt-1"},
                "attendanceIntervals": [{"joinDateTime": MIN_VALUE, "leaveDateTime": now}],
            },
        ],
    }
    intervals, started = _intervals_from_reports(settings, "apt-x", [report])
    [(_, kept)] = intervals.items()
    assert [i.left_at for i in kept] == [None, datetime.fromisoformat(now)]
    assert started == datetime.fromisoformat(now)

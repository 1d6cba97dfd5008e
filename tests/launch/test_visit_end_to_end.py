from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from libs.common.events import (
    AppointmentCreatedV1,
    MeetingEndedV1,
    PatientJoinedV1,
    decode_event,
)
from sandbox.ehr import TENANT_A
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem, follow


async def book_video_visit(http: aiohttp.ClientSession, system: LaunchSystem) -> dict[str, Any]:
    """Books a video visit in the EHR stand-in, which fires the signed scheduling webhook."""
    base = f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}"
    async with http.get(f"{base}/directory") as r:
        directory = await r.json()
    body = {
        "patient": directory["patients"][0]["id"],
        "practitioner": directory["practitioners"][0]["id"],
        "location": directory["locations"][0]["id"],
        "start": (datetime.now(UTC) + timedelta(minutes=10)).isoformat(),
        "minutes": 30,
        "video": True,
    }
    async with http.post(f"{base}/appointments", json=body) as r:
        assert r.status == 201, await r.text()
        appointment: dict[str, Any] = await r.json()
    return appointment


async def launch_from_ehr(
    http: aiohttp.ClientSession, system: LaunchSystem, appointment_id: str
) -> tuple[int, str, dict[str, str]]:
    async with http.post(
        f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/launches",
        json={"appointment": appointment_id},
    ) as r:
        assert r.status in (200, 201), await r.text()
        launch_url = (await r.json())["launch_url"]
    response, body, cookies = await follow(http, launch_url)
    return response.status, body, cookies


async def meeting_action(
    http: aiohttp.ClientSession, system: LaunchSystem, meeting_id: str, action: str, **body: Any
) -> dict[str, Any]:
    async with http.post(
        f"{system.microsoft.base_url}/_sandbox/meetings/{meeting_id}/{action}", json=body
    ) as r:
        assert r.status == 200, await r.text()
        result: dict[str, Any] = await r.json()
        return result


async def test_visit_from_booking_to_meeting_end(
    launch_system: LaunchSystem,
    topic_prefix: str,
    database_url: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """Booking, provider launch (twice), patient join, lobby, admission and the end of the
    meeting each produce the right events, with one meeting and no patient data."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system)
        created = await read_all(topic_prefix + "appointment-created", expect=1)
        assert len(created) == 1
        event = decode_event(created[0])
        payload = event.payload
        assert isinstance(payload, AppointmentCreatedV1)
        assert payload.integration_id == system.integration_id
        assert payload.sms_enabled
        assert payload.patient_phone_encrypted is not None
        assert payload.patient_phone_encrypted.startswith("enc:v1:")
        assert payload.join_url is not None

        status, body, _ = await launch_from_ehr(http, system, appointment["id"])
        assert status == 200, body
        assert "Join the meeting" in body
        status, body, _ = await launch_from_ehr(http, system, appointment["id"])
        assert status == 200, body

        async with microsoft_http.get(f"{system.microsoft.base_url}/_sandbox/meetings") as r:
            meetings = await r.json()
        assert len(meetings) == 1, "a relaunch must not create a second meeting"

        async with http.get(payload.join_url) as r:
            assert r.status == 200
            assert "Join the visit" in await r.text()

    conn = await asyncpg.connect(database_url)
    try:
        meeting_id = await conn.fetchval(
            "SELECT meeting_id FROM launch.appointments WHERE appointment_key = $1", event.key
        )
    finally:
        await conn.close()
    await meeting_action(microsoft_http, system, meeting_id, "join", role="organizer")
    await meeting_action(microsoft_http, system, meeting_id, "join", role="attendee", display="Pat")
    await meeting_action(microsoft_http, system, meeting_id, "admit")
    await meeting_action(microsoft_http, system, meeting_id, "end")

    ended = await read_all(topic_prefix + "meeting-ended", expect=1, within_s=20)
    assert len(ended) == 1
    end = decode_event(ended[0])
    assert end.key == event.key
    assert isinstance(end.payload, MeetingEndedV1)
    roles = sorted(p.role for p in end.payload.participants)
    assert roles == ["organizer", "patient"]
    patient = next(p for p in end.payload.participants if p.role == "patient")
    assert patient.lobby_entered_at is not None
    assert patient.admitted_at is not None
    assert patient.admitted_at >= patient.lobby_entered_at
    assert patient.intervals
    assert end.payload.meeting_started_at is not None

    joined = [decode_event(v) for v in await read_all(topic_prefix + "patient-joined", expect=2)]
    assert len(joined) == 2  # the join page, then the Teams lobby
    assert all(isinstance(j.payload, PatientJoinedV1) for j in joined)
    for raw in created + ended:
        assert b"Pat" not in raw.replace(b"Patient", b"").replace(b"patient", b"")

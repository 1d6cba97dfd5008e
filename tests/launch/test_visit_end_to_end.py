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
from tests.support.privacy import find_markers, patient_markers, scan_schema


async def book_video_visit(
    http: aiohttp.ClientSession, system: LaunchSystem, starts_in: timedelta = timedelta(minutes=10)
) -> dict[str, Any]:
    """Books a video visit in the EHR stand-in, which fires the signed scheduling webhook
    (when the tenant's feed is on); the FHIR Appointment."""
    base = f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}"
    async with http.get(f"{base}/directory") as r:
        directory = await r.json()
    body = {
        "patient": directory["patients"][0]["id"],
        "practitioner": directory["practitioners"][0]["id"],
        "location": directory["locations"][0]["id"],
        "start": (datetime.now(UTC) + starts_in).isoformat(),
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

    markers = patient_markers(system.ehr, TENANT_A)
    for raw in created + ended + [e.model_dump_json().encode() for e in joined]:
        assert find_markers(raw.decode(), markers) == []
    conn = await asyncpg.connect(database_url)
    try:
        assert await scan_schema(conn, "launch", markers) == []
    finally:
        await conn.close()


# Every column the gateway stores, and why none of it identifies a patient.
STORED_COLUMNS = {
    "appointments": {
        "appointment_key": "keyed hash of (integration, FHIR Appointment id)",
        "tenant_id": "the customer organisation",
        "integration_id": "our id",
        "environment": "test or production",
        "department": "a clinic or department name",
        "starts_at": "schedule",
        "ends_at": "schedule",
        "time_zone": "schedule",
        "created_at": "bookkeeping",
        "status": "booked or cancelled",
        "schedule_version": "EHR version counter",
        "ehr_user_id": "the clinician's EHR user id (the one thing we keep about users)",
        "organizer_id": "the Teams organizer account (staff)",
        "meeting_id": "Teams meeting id",
        "join_web_url": "Teams meeting URL",
        "patient_join_url": "Teams browser-join URL (no patient data)",
        "subscription_id": "Graph subscription id",
        "subscription_expires_at": "bookkeeping",
        "client_state_hash": "hash of a random secret",
        "meeting_ended_at": "bookkeeping",
        "updated_at": "bookkeeping",
        "meeting_attempts": "bookkeeping: failed meeting preparations",
        "meeting_retry_at": "bookkeeping",
        "meeting_times_stale": "rescheduled since its meeting was made: Graph to be told",
        "meeting_move_attempts": "bookkeeping: failed meeting moves",
        "meeting_move_retry_at": "bookkeeping: a move's lease or backoff",
    },
    "integrations": None,  # organisation configuration, projected from integration-config
    "launch_states": {
        "state_hash": "hash of a random state",
        "integration_id": "our id",
        "secrets": "ciphertext: PKCE verifier and nonce",
        "expires_at": "bookkeeping",
    },
    "provider_sessions": {
        "token_hash": "hash of a random cookie",
        "integration_id": "our id",
        "ehr_user_id": "the clinician's EHR user id",
        "appointment_key": "keyed hash",
        "candidates": "ciphertext: appointment ids, times, departments",
        "smart_tokens": "ciphertext: the SMART access and refresh token",
        "csrf_token": "random",
        "expires_at": "bookkeeping",
    },
    "scheduling_deliveries": {"event_id": "EHR event id", "received_at": "bookkeeping"},
    "roster": {
        "appointment_key": "keyed hash",
        "participant": "keyed pseudonym of a call leg",
        "role": "organizer, staff or patient",
        "state": "lobby, admitted or left",
        "lobby_entered_at": "time",
        "admitted_at": "time",
        "joined_at": "time",
        "left_at": "time",
        "updated_at": "bookkeeping",
    },
    "graph_notifications": {"digest": "hash of a notification", "received_at": "bookkeeping"},
    "lobby_arrivals": {
        "appointment_key": "keyed hash",
        "participant": "keyed pseudonym of a device",
        "arrived_at": "time",
    },
    "outbox": None,  # events, checked on Kafka above
    "inbox": None,
    "schema_migrations": None,
}


async def test_every_stored_column_is_accounted_for(
    launch_system: LaunchSystem, database_url: str
) -> None:
    """The gateway's tables hold only the columns listed with a reason above; a new column
    must be justified here before it can land."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'launch' ORDER BY table_name, ordinal_position"
        )
    finally:
        await conn.close()
    stored: dict[str, set[str]] = {}
    for row in rows:
        stored.setdefault(row["table_name"], set()).add(row["column_name"])
    assert set(stored) == set(STORED_COLUMNS)
    for table, columns in STORED_COLUMNS.items():
        if columns is not None:
            assert stored[table] == set(columns), table

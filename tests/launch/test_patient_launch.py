from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
import structlog

from libs.common.keys import appointment_key
from sandbox.ehr import TENANT_A, TENANT_B
from services.launch import join_tokens
from services.launch.fhir import Appointment
from services.launch.patient_launch import todays_visit
from services.launch.settings import LaunchSettings
from services.launch.smart import SmartError, patient_in_context
from tests.conftest import running_app
from tests.launch.test_launch_refusals import Trap
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem, follow
from tests.support.privacy import find_markers, patient_markers, scan_schema

NOT_CONFIGURED = "This FHIR URL is not configured for the Teams connector"
# In the stand-in's sample data this patient has no video visit of its own.
PATIENT, OTHER = 2, 1


@pytest.fixture
async def trap() -> AsyncIterator[tuple[Trap, str]]:
    trap = Trap()
    async with running_app(trap.app) as url:
        yield trap, url


async def _ehr(
    http: aiohttp.ClientSession, system: LaunchSystem, method: str, path: str, body: Any = None
) -> Any:
    async with http.request(
        method, f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}{path}", json=body
    ) as r:
        assert r.status < 300, await r.text()
        return await r.json()


async def _patient_id(http: aiohttp.ClientSession, system: LaunchSystem, index: int) -> str:
    directory = await _ehr(http, system, "GET", "/directory")
    return str(directory["patients"][index]["id"])


async def _book(http: aiohttp.ClientSession, system: LaunchSystem, index: int) -> dict[str, Any]:
    """Books a video visit in ten minutes for the directory's `index`th patient."""
    directory = await _ehr(http, system, "GET", "/directory")
    body = {
        "patient": directory["patients"][index]["id"],
        "practitioner": directory["practitioners"][0]["id"],
        "location": directory["locations"][0]["id"],
        "start": (datetime.now(UTC) + timedelta(minutes=10)).isoformat(),
        "minutes": 30,
        "video": True,
    }
    appointment: dict[str, Any] = await _ehr(http, system, "POST", "/appointments", body)
    return appointment


async def _portal_launch(http: aiohttp.ClientSession, system: LaunchSystem, index: int) -> str:
    """What the patient portal does: register our patient launch URL, launch the patient."""
    portal = f"{system.url}/launch/patient/{system.integration_id}"
    await _ehr(http, system, "PATCH", "", {"patient_launch_url": portal})
    patient = await _patient_id(http, system, index)
    body = await _ehr(http, system, "POST", "/launches", {"patient": patient, "persona": "patient"})
    return str(body["launch_url"])


async def _count(database_url: str, sql: str, *args: Any) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


async def test_patient_launch_lands_on_the_prejoin_page_of_their_visit(
    launch_system: LaunchSystem,
    topic_prefix: str,
    database_url: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """A plain client following the portal launch ends on the visit's pre-join page."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment = await _book(http, system, PATIENT)
        await read_all(topic_prefix + "appointment-created", expect=1)
        launch_url = await _portal_launch(http, system, PATIENT)
        patient = await _patient_id(http, system, PATIENT)
        with structlog.testing.capture_logs() as logs:
            async with http.get(launch_url) as r:
                body = await r.text()
                assert r.status == 200, body
                final = r.url
        assert "Join the visit" in body
        assert "Contoso Health" in body
        assert final.path.startswith("/join/")
        key = join_tokens.verify(
            system.settings.join_token_secret.get_secret_value(),
            final.path.removeprefix("/join/"),
        )
        expected = appointment_key(
            system.settings.appointment_key_secret.get_secret_value(),
            system.integration_id,
            appointment["id"],
        )
        assert key == expected
        async with microsoft_http.get(f"{system.microsoft.base_url}/_sandbox/meetings") as r:
            assert len(await r.json()) == 1, "the booking's meeting is reused"
    lobby = "SELECT count(*) FROM launch.lobby_arrivals WHERE appointment_key = $1"
    assert await _count(database_url, lobby, key) == 1
    joined = "SELECT count(*) FROM launch.outbox WHERE topic = 'patient-joined' AND key = $1"
    assert await _count(database_url, joined, key) == 1
    assert await _count(database_url, "SELECT count(*) FROM launch.provider_sessions") == 0
    assert any(entry.get("event") == "patient launch to join page" for entry in logs)
    markers = [*patient_markers(system.ehr, TENANT_A), patient]
    assert find_markers(repr(logs), markers) == []
    conn = await asyncpg.connect(database_url)
    try:
        assert await scan_schema(conn, "launch", patient_markers(system.ehr, TENANT_A)) == []
        assert await conn.fetchval("SELECT ehr_user_id FROM launch.appointments") is None
    finally:
        await conn.close()


async def test_visit_unknown_to_the_gateway_gets_its_meeting_on_patient_launch(
    launch_system: LaunchSystem,
    topic_prefix: str,
    database_url: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """A visit the feed never announced gets its meeting now, with no EHR user id."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        await _ehr(http, system, "PATCH", "", {"webhook_url": ""})
        appointment = await _book(http, system, PATIENT)
        response, body, _ = await follow(http, await _portal_launch(http, system, PATIENT))
        assert response.status == 200, body
        assert response.url.path.startswith("/join/")
        async with microsoft_http.get(f"{system.microsoft.base_url}/_sandbox/meetings") as r:
            assert len(await r.json()) == 1
    created = await read_all(topic_prefix + "appointment-created", expect=1)
    assert len(created) == 1
    key = appointment_key(
        system.settings.appointment_key_secret.get_secret_value(),
        system.integration_id,
        appointment["id"],
    )
    unowned = "SELECT count(*) FROM launch.appointments WHERE appointment_key = $1"
    assert await _count(database_url, unowned + " AND ehr_user_id IS NULL", key) == 1


@pytest.mark.parametrize(
    "iss_suffix", ["/r4/unknown", f"/r4/{TENANT_A}/", "@127.0.0.1/r4", "#frag"]
)
async def test_foreign_iss_is_refused_without_any_outbound_request(
    launch_system: LaunchSystem, trap: tuple[Trap, str], iss_suffix: str
) -> None:
    """An iss that is not byte for byte this integration's FHIR base gets 403 and no call."""
    server, url = trap
    route = f"{launch_system.url}/launch/patient/{launch_system.integration_id}"
    async with aiohttp.ClientSession() as http:
        for iss in (url + iss_suffix, launch_system.ehr.fhir_base(TENANT_B)):
            async with http.get(
                route, params={"iss": iss, "launch": "abc"}, allow_redirects=False
            ) as r:
                assert r.status == 403
                assert NOT_CONFIGURED in await r.text()
        async with http.get(
            f"{launch_system.url}/launch/patient/not-a-uuid",
            params={"iss": url, "launch": "abc"},
            allow_redirects=False,
        ) as r:
            assert r.status == 404
    assert server.hits == 0


async def test_patient_cannot_reach_another_patients_appointment(
    launch_system: LaunchSystem, topic_prefix: str, database_url: str
) -> None:
    """A patient without a visit today gets the friendly page, never another's visit."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        await _book(http, system, OTHER)
        await read_all(topic_prefix + "appointment-created", expect=1)
        response, body, _ = await follow(http, await _portal_launch(http, system, PATIENT))
        assert response.status == 404
        assert "No video visit today" in body
        assert "/join/" not in str(response.url)
    assert await _count(database_url, "SELECT count(*) FROM launch.lobby_arrivals") == 0


def _appointment(patient: str, start: datetime) -> Appointment:
    return Appointment.model_validate(
        {
            "resourceType": "Appointment",
            "id": "4711",
            "status": "booked",
            "start": start.isoformat(),
            "end": (start + timedelta(minutes=30)).isoformat(),
            "serviceType": [{"coding": [{"code": "VIDEO_VISIT"}]}],
            "participant": [{"actor": {"reference": f"Patient/{patient}"}}],
        }
    )


def test_gateway_drops_appointments_of_other_patients_whatever_the_ehr_returns() -> None:
    """Even if the EHR answered with another patient's visit, the gateway does not use it."""
    now = datetime.now(UTC)
    settings = LaunchSettings()
    soon = now + timedelta(minutes=5)
    assert todays_visit(settings, [_appointment("other", soon)], "me", now) is None
    assert todays_visit(settings, [_appointment("me", soon)], "me", now) is not None


def test_a_visit_whose_times_cannot_be_used_is_not_todays_visit() -> None:
    """An end near year 9999 (or before the start) is dropped, not an overflow (a 500)."""
    now = datetime.now(UTC)
    soon = now + timedelta(minutes=5)
    for end in ("9999-12-31T23:59:00+00:00", (soon - timedelta(minutes=1)).isoformat()):
        odd = _appointment("me", soon).model_copy(update={"end": datetime.fromisoformat(end)})
        assert todays_visit(LaunchSettings(), [odd], "me", now) is None


def test_patient_context_must_be_the_patient_who_signed_in() -> None:
    """The token's patient must be the id_token's fhirUser Patient; errors never name it."""
    iss = "https://fhir.example/r4/t"
    assert patient_in_context({"fhirUser": f"{iss}/Patient/12"}, iss, "12") == "12"
    assert patient_in_context({"fhirUser": "Patient/12"}, iss, "12") == "12"
    for claims, patient in (
        ({"fhirUser": f"{iss}/Patient/12"}, "13"),
        ({"fhirUser": f"{iss}/Patient/12"}, None),
        ({"fhirUser": f"{iss}/RelatedPerson/12"}, "12"),
        ({"fhirUser": "https://other.example/r4/t/Patient/12"}, "12"),
    ):
        with pytest.raises(SmartError) as refused:
            patient_in_context(claims, iss, patient)
        assert "12" not in str(refused.value)


async def test_replayed_state_is_refused(launch_system: LaunchSystem, topic_prefix: str) -> None:
    """The callback's state is single use for patient launches too: a replay gets 400."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        await _book(http, system, PATIENT)
        await read_all(topic_prefix + "appointment-created", expect=1)
        async with http.get(
            await _portal_launch(http, system, PATIENT), allow_redirects=False
        ) as r:
            assert r.status == 302
            authorize = r.headers["Location"]
        query = parse_qs(urlsplit(authorize).query)
        assert urlsplit(authorize).path.endswith("/personas/patient/authorize")
        assert query["aud"] == [system.fhir_base]
        assert query["scope"] == [system.settings.smart_patient_scopes]
        assert query["code_challenge_method"] == ["S256"]
        async with http.get(authorize, allow_redirects=False) as r:
            assert r.status == 302
            callback = r.headers["Location"]
        first, _, _ = await follow(http, callback)
        assert first.status == 200
        assert first.url.path.startswith("/join/")
        async with http.get(callback, allow_redirects=False) as r:
            assert r.status == 400
            assert "expired or was already used" in await r.text()

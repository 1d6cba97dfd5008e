"""Contract tests: FHIR R4 REST of the EHR stand-in (auth, Cerner search rules, PATCH)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sandbox.ehr import TENANT_B
from sandbox.ehr.clock import FakeClock
from tests.sandbox.ehr_helpers import SCOPE, Smart


def _today(clock: FakeClock) -> tuple[str, str]:
    day = datetime.fromtimestamp(clock(), UTC).date()
    return day.isoformat(), (day + timedelta(days=1)).isoformat()


async def _token(smart: Smart, client: str = "fhir-app", scope: str = SCOPE) -> dict[str, Any]:
    if client not in smart.ehr.tenant(smart.tenant).clients:
        await smart.register(client)
    return await smart.access_token(client, scope)


async def test_missing_bearer_token_is_401_operation_outcome(smart: Smart) -> None:
    """A FHIR read without a bearer token is 401 with an OperationOutcome and a challenge."""
    appt = (await smart.appointments())[0]
    status, body, resp = await smart.fhir(f"Appointment/{appt['id']}", None)
    assert status == 401
    assert body["resourceType"] == "OperationOutcome"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert resp.content_type == "application/fhir+json"


async def test_unknown_token_is_401(smart: Smart) -> None:
    """An access token the server never issued is 401."""
    appt = (await smart.appointments())[0]
    status, _, _ = await smart.fhir(f"Appointment/{appt['id']}", "made-up-token")
    assert status == 401


async def test_expired_token_is_401(smart: Smart, ehr_clock: FakeClock) -> None:
    """An access token older than its 570 s lifetime is refused with 401."""
    tok = await _token(smart)
    ehr_clock.advance(569)
    assert (await smart.fhir(f"Patient/{tok['patient']}", tok["access_token"]))[0] == 200
    ehr_clock.advance(2)
    status, body, _ = await smart.fhir(f"Patient/{tok['patient']}", tok["access_token"])
    assert status == 401
    assert "expired" in body["issue"][0]["diagnostics"]


async def test_other_tenants_token_is_401(smart: Smart) -> None:
    """A token issued by tenant A is not valid at tenant B's FHIR base."""
    tok = await _token(smart)
    other = Smart(smart.ehr, smart.http, TENANT_B)
    appt = (await other.appointments())[0]
    status, _, _ = await other.fhir(f"Appointment/{appt['id']}", tok["access_token"])
    assert status == 401


async def test_tenants_hold_different_data(smart: Smart) -> None:
    """Tenant A's resources are not readable at tenant A's ids in tenant B (isolation)."""
    tok = await _token(smart)
    status, _, _ = await smart.fhir(
        f"Patient/{tok['patient']}", tok["access_token"], base=smart.ehr.fhir_base(TENANT_B)
    )
    assert status == 401
    other_ids = set(smart.ehr.tenant(TENANT_B).data.resources["Patient"])
    assert tok["patient"] not in other_ids


async def test_missing_scope_is_403(smart: Smart) -> None:
    """A token without user/Appointment.read cannot read an Appointment (403)."""
    scope = "launch openid fhirUser user/Patient.read"
    tok = await _token(smart, "fhir-narrow", scope)
    appt = (await smart.appointments())[0]
    status, body, _ = await smart.fhir(f"Appointment/{appt['id']}", tok["access_token"])
    assert status == 403
    assert body["resourceType"] == "OperationOutcome"
    assert (await smart.fhir(f"Patient/{tok['patient']}", tok["access_token"]))[0] == 200


async def test_read_returns_fhir_json_with_etag(smart: Smart) -> None:
    """Reads answer application/fhir+json with a weak ETag of the version."""
    tok = await _token(smart)
    appt = (await smart.appointments())[0]
    status, body, resp = await smart.fhir(f"Appointment/{appt['id']}", tok["access_token"])
    assert status == 200
    assert resp.content_type == "application/fhir+json"
    assert resp.headers["ETag"] == f'W/"{body["meta"]["versionId"]}"'


async def test_unknown_resource_is_404(smart: Smart) -> None:
    """Reading a missing id is 404 with an OperationOutcome."""
    tok = await _token(smart)
    status, body, _ = await smart.fhir("Appointment/99999999", tok["access_token"])
    assert status == 404
    assert body["issue"][0]["code"] == "not-found"


async def test_video_appointment_shape(smart: Smart) -> None:
    """A video Appointment carries status, start/end, serviceType marker and three participants."""
    tok = await _token(smart)
    appt = next(a for a in await smart.appointments() if a["video"])
    _, body, _ = await smart.fhir(f"Appointment/{appt['id']}", tok["access_token"])
    assert body["status"] == "booked"
    assert body["start"] < body["end"]
    assert body["serviceType"][0]["coding"][0]["code"] == "VIDEO_VISIT"
    kinds = {p["actor"]["reference"].split("/")[0] for p in body["participant"]}
    assert kinds == {"Patient", "Practitioner", "Location"}


async def test_appointment_search_by_patient_and_date(smart: Smart, ehr_clock: FakeClock) -> None:
    """Appointment?patient=..&date=ge..&date=lt.. returns a searchset Bundle of that day."""
    tok = await _token(smart)
    day, nxt = _today(ehr_clock)
    q = f"Appointment?patient={tok['patient']}&date=ge{day}&date=lt{nxt}"
    status, bundle, _ = await smart.fhir(q, tok["access_token"])
    assert status == 200
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    assert bundle["total"] >= 1
    for entry in bundle["entry"]:
        res = entry["resource"]
        assert entry["fullUrl"] == f"{smart.base}/Appointment/{res['id']}"
        assert res["start"].startswith(day)
    q = f"Appointment?patient={tok['patient']}&date=ge{nxt}"
    _, later, _ = await smart.fhir(q, tok["access_token"])
    assert later["total"] == 0


@pytest.mark.parametrize("param", ["patient", "practitioner", "location"])
async def test_appointment_search_without_date_is_400(smart: Smart, param: str) -> None:
    """Cerner requires a date with patient, practitioner or location."""
    tok = await _token(smart)
    appt = (await smart.appointments())[0]
    status, body, _ = await smart.fhir(f"Appointment?{param}={appt[param]}", tok["access_token"])
    assert status == 400
    assert body["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "pair", [("patient", "practitioner"), ("patient", "location"), ("practitioner", "location")]
)
async def test_appointment_search_combining_params_is_400(
    smart: Smart, ehr_clock: FakeClock, pair: tuple[str, str]
) -> None:
    """Cerner refuses combining two of patient, practitioner and location."""
    tok = await _token(smart)
    appt = (await smart.appointments())[0]
    day, _ = _today(ehr_clock)
    q = f"Appointment?{pair[0]}={appt[pair[0]]}&{pair[1]}={appt[pair[1]]}&date={day}"
    status, body, _ = await smart.fhir(q, tok["access_token"])
    assert status == 400
    assert body["issue"][0]["code"] == "invalid"


async def test_appointment_search_without_params_is_400(smart: Smart) -> None:
    """An Appointment search with no parameters is refused."""
    tok = await _token(smart)
    assert (await smart.fhir("Appointment", tok["access_token"]))[0] == 400


async def test_encounter_search_by_patient(smart: Smart) -> None:
    """Encounter?patient= finds encounters that reference their appointment."""
    tok = await _token(smart)
    status, bundle, _ = await smart.fhir(f"Encounter?patient={tok['patient']}", tok["access_token"])
    assert status == 200
    assert any(e["resource"]["id"] == tok["encounter"] for e in bundle["entry"])


# --- PATCH --------------------------------------------------------------------------------

WRITE_SCOPE = SCOPE + " user/Appointment.write"
LINKS = [
    {"op": "add", "path": "/contained/0/telecom/0/value", "value": "https://teams.example/p"},
    {"op": "add", "path": "/contained/1/telecom/0/value", "value": "https://teams.example/v"},
]


async def _patch(
    smart: Smart, token: str, aid: str, ops: Any, if_match: str | None
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json-patch+json"}
    if if_match is not None:
        headers["If-Match"] = if_match
    url = f"{smart.base}/Appointment/{aid}"
    async with smart.http.patch(url, data=json.dumps(ops), headers=headers) as resp:
        return resp.status, resp.headers.get("ETag", "")


async def test_patch_video_links_with_if_match(smart: Smart) -> None:
    """PATCH with the current If-Match adds video links in contained[0..1] and bumps the version."""
    tok = await _token(smart, "fhir-writer", WRITE_SCOPE)
    aid = next(a["id"] for a in await smart.appointments() if a["video"])
    status, etag = await _patch(smart, tok["access_token"], aid, LINKS, 'W/"1"')
    assert status == 200
    assert etag == 'W/"2"'
    _, body, _ = await smart.fhir(f"Appointment/{aid}", tok["access_token"])
    assert body["contained"][0]["telecom"][0]["value"] == "https://teams.example/p"
    assert body["contained"][1]["telecom"][0]["value"] == "https://teams.example/v"
    # Adding again is a conflict; replace works.
    assert (await _patch(smart, tok["access_token"], aid, LINKS, 'W/"2"'))[0] == 409
    replace = [{**LINKS[0], "op": "replace", "value": "https://teams.example/p2"}]
    assert (await _patch(smart, tok["access_token"], aid, replace, 'W/"2"'))[0] == 200


async def test_patch_refusals(smart: Smart) -> None:
    """PATCH: no If-Match is 412, stale version 409, mixed add/replace 422, read-only token 403."""
    tok = await _token(smart, "fhir-writer2", WRITE_SCOPE)
    aid = next(a["id"] for a in await smart.appointments() if a["video"])
    assert (await _patch(smart, tok["access_token"], aid, LINKS, None))[0] == 412
    assert (await _patch(smart, tok["access_token"], aid, LINKS, 'W/"7"'))[0] == 409
    mixed = [LINKS[0], {**LINKS[1], "op": "replace"}]
    assert (await _patch(smart, tok["access_token"], aid, mixed, 'W/"1"'))[0] == 422
    bad_path = [{"op": "replace", "path": "/start", "value": "2030-01-01T00:00:00Z"}]
    assert (await _patch(smart, tok["access_token"], aid, bad_path, 'W/"1"'))[0] == 422
    read_only = await _token(smart)
    assert (await _patch(smart, read_only["access_token"], aid, LINKS, 'W/"1"'))[0] == 403

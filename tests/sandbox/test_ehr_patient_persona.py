"""Contract tests: Cerner's patient persona in the EHR stand-in (patient-portal launches)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest

from sandbox.ehr import TENANT_A
from sandbox.ehr.clock import FakeClock
from tests.sandbox.ehr_helpers import REDIRECT_URI, SCOPE, Smart, pkce_pair

PATIENT_SCOPE = "launch openid fhirUser patient/Appointment.read patient/Patient.read"


def _auth_base(smart: Smart) -> str:
    return f"{smart.ehr.url}/tenants/{TENANT_A}/protocols/oauth2/profiles/smart-v1"


async def _patient_launch(smart: Smart, appointment: str | None = None) -> dict[str, Any]:
    if appointment is None:
        appointment = next(a["id"] for a in await smart.appointments() if a["video"])
    path = f"/_sandbox/tenants/{TENANT_A}/launches"
    body = {"appointment": appointment, "persona": "patient"}
    return dict(await smart.admin("POST", path, body))


async def _authorize(
    smart: Smart, launch: str, challenge: str, persona: str = "patient", **override: str | None
) -> tuple[int, dict[str, str]]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": "portal-app",
        "redirect_uri": REDIRECT_URI,
        "scope": PATIENT_SCOPE,
        "state": "st-p",
        "nonce": "n-p",
        "launch": launch,
        "aud": smart.base,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(override)
    query = {k: v for k, v in params.items() if v is not None}
    url = f"{_auth_base(smart)}/personas/{persona}/authorize"
    async with smart.http.get(url, params=query, allow_redirects=False) as resp:
        location = resp.headers.get("Location", "")
        return resp.status, {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def _patient_token(smart: Smart, appointment: str | None = None) -> dict[str, Any]:
    await smart.register("portal-app")
    launch = await _patient_launch(smart, appointment)
    verifier, challenge = pkce_pair()
    status, query = await _authorize(smart, launch["launch"], challenge)
    assert status == 302
    assert "code" in query, query
    status, body = await smart.exchange("portal-app", query["code"], verifier)
    assert status == 200, body
    return body


def _day(clock: FakeClock) -> tuple[str, str]:
    today = datetime.fromtimestamp(clock(), UTC).date()
    return today.isoformat(), (today + timedelta(days=1)).isoformat()


async def test_discovery_keeps_provider_persona_and_lists_patient_scopes(smart: Smart) -> None:
    """smart-configuration still names the provider persona and now lists patient scopes."""
    cfg = await smart.config()
    assert cfg["authorization_endpoint"] == f"{_auth_base(smart)}/personas/provider/authorize"
    assert {"patient/Appointment.read", "patient/Patient.read"} <= set(cfg["scopes_supported"])
    assert "permission-patient" in cfg["capabilities"]
    tenants = await smart.admin("GET", "/_sandbox/tenants")
    row = next(t for t in tenants["tenants"] if t["guid"] == TENANT_A)
    assert row["patient_authorize_endpoint"] == f"{_auth_base(smart)}/personas/patient/authorize"


async def test_patient_launch_happy_path(smart: Smart) -> None:
    """Patient launch -> patient persona authorize -> token whose user is the patient."""
    appt = next(a for a in await smart.appointments() if a["video"])
    body = await _patient_token(smart, appt["id"])
    assert body["patient"] == appt["patient"]
    assert "encounter" not in body
    assert "user" not in body
    assert set(body["scope"].split()) == set(PATIENT_SCOPE.split())
    assert "refresh_token" not in body
    kid = jwt.get_unverified_header(body["id_token"])["kid"]
    claims = jwt.decode(
        body["id_token"],
        (await smart.jwks())[kid].key,
        algorithms=["RS256"],
        audience="portal-app",
        issuer=(await smart.config())["issuer"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["fhirUser"] == f"{smart.base}/Patient/{appt['patient']}"
    assert claims["sub"] == appt["patient"]
    assert claims["nonce"] == "n-p"
    token = body["access_token"]
    status, own, _ = await smart.fhir(f"Patient/{appt['patient']}", token)
    assert status == 200
    assert own["id"] == appt["patient"]
    status, got, _ = await smart.fhir(f"Appointment/{appt['id']}", token)
    assert status == 200
    assert got["id"] == appt["id"]


async def test_patient_token_reads_only_its_own_compartment(
    smart: Smart, ehr_clock: FakeClock
) -> None:
    """Another patient's Patient, Appointment or appointment search is 403; searches that do
    not name a patient return only the patient's own appointments."""
    appts = await smart.appointments()
    mine = next(a for a in appts if a["video"])
    other = next(a for a in appts if a["patient"] != mine["patient"])
    token = (await _patient_token(smart, mine["id"]))["access_token"]
    day, nxt = _day(ehr_clock)

    status, _, _ = await smart.fhir(f"Patient/{other['patient']}", token)
    assert status == 403
    status, _, _ = await smart.fhir(f"Appointment/{other['id']}", token)
    assert status == 403
    q = f"Appointment?patient={other['patient']}&date=ge{day}&date=lt{nxt}"
    status, outcome, _ = await smart.fhir(q, token)
    assert status == 403
    assert outcome["resourceType"] == "OperationOutcome"
    q = f"Appointment?patient=Patient/{other['patient']},{mine['patient']}&date=ge{day}"
    status, _, _ = await smart.fhir(q, token)
    assert status == 403

    q = f"Appointment?patient={mine['patient']}&date=ge{day}&date=lt{nxt}"
    status, bundle, _ = await smart.fhir(q, token)
    assert status == 200
    expected = {a["id"] for a in appts if a["patient"] == mine["patient"]}
    assert {e["resource"]["id"] for e in bundle["entry"]} == expected
    q = f"Appointment?practitioner={other['practitioner']}&date=ge{day}&date=lt{nxt}"
    status, bundle, _ = await smart.fhir(q, token)
    assert status == 200
    assert all(e["resource"]["id"] in expected for e in bundle["entry"])
    status, bundle, _ = await smart.fhir(f"Appointment?_id={other['id']}", token)
    assert status == 200
    assert bundle["total"] == 0
    status, _, _ = await smart.fhir(f"Practitioner/{mine['practitioner']}", token)
    assert status == 403  # no patient compartment: no scope grants it


async def test_provider_token_is_not_confined(smart: Smart, ehr_clock: FakeClock) -> None:
    """The provider persona keeps user/ scopes: any patient of the tenant is readable."""
    await smart.register("app-provider")
    body = await smart.access_token("app-provider")
    other = next(a for a in await smart.appointments() if a["patient"] != body["patient"])
    status, _, _ = await smart.fhir(f"Patient/{other['patient']}", body["access_token"])
    assert status == 200


@pytest.mark.parametrize(
    ("persona", "launch_persona", "override", "error"),
    [
        ("provider", "patient", {}, "invalid_request"),
        ("patient", "provider", {"scope": PATIENT_SCOPE}, "invalid_request"),
        ("patient", "patient", {"scope": PATIENT_SCOPE + " user/Patient.read"}, "invalid_scope"),
        ("patient", "patient", {"aud": None}, "invalid_request"),
        ("patient", "patient", {"aud": "{base}/"}, "invalid_request"),
        ("patient", "patient", {"code_challenge": None}, "invalid_request"),
        ("patient", "patient", {"code_challenge_method": "plain"}, "invalid_request"),
        ("patient", "patient", {"scope": "openid patient/Patient.read"}, "invalid_scope"),
    ],
)
async def test_patient_persona_authorize_refusals(
    smart: Smart, persona: str, launch_persona: str, override: dict[str, str | None], error: str
) -> None:
    """Wrong persona for the launch, user scopes, no or wrong aud, no PKCE: error redirect."""
    await smart.register("portal-app")
    if launch_persona == "patient":
        launch = (await _patient_launch(smart))["launch"]
    else:
        launch = (await smart.launch())["launch"]
    _, challenge = pkce_pair()
    if override.get("aud"):
        override = {**override, "aud": str(override["aud"]).format(base=smart.base)}
    scope = override.pop("scope", PATIENT_SCOPE if persona == "patient" else SCOPE)
    status, query = await _authorize(smart, launch, challenge, persona, scope=scope, **override)
    assert status == 302
    assert query["error"] == error, query
    assert query["state"] == "st-p"
    assert "code" not in query


async def test_patient_persona_unregistered_redirect_uri_is_400_page(smart: Smart) -> None:
    """An unregistered redirect_uri is never redirected to on the patient persona either."""
    await smart.register("portal-app")
    launch = await _patient_launch(smart)
    _, challenge = pkce_pair()
    status, query = await _authorize(
        smart, launch["launch"], challenge, redirect_uri="http://127.0.0.1:9/evil"
    )
    assert status == 400
    assert query == {}


async def test_patient_codes_are_single_use_and_bound_to_pkce_and_redirect(smart: Smart) -> None:
    """A wrong verifier, a different redirect_uri and a reused code are all invalid_grant."""
    await smart.register("portal-app")

    async def code() -> tuple[str, str]:
        verifier, challenge = pkce_pair()
        launch = await _patient_launch(smart)
        _, query = await _authorize(smart, launch["launch"], challenge)
        return query["code"], verifier

    value, _ = await code()
    status, body = await smart.exchange("portal-app", value, pkce_pair()[0])
    assert (status, body["error"]) == (400, "invalid_grant")

    value, verifier = await code()
    form = {
        "grant_type": "authorization_code",
        "code": value,
        "redirect_uri": REDIRECT_URI + "x",
        "code_verifier": verifier,
    }
    status, body = await smart.token(form, ("portal-app", "portal-app-secret"))
    assert (status, body["error"]) == (400, "invalid_grant")

    value, verifier = await code()
    status, first = await smart.exchange("portal-app", value, verifier)
    assert status == 200
    status, body = await smart.exchange("portal-app", value, verifier)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, _, _ = await smart.fhir(f"Patient/{first['patient']}", first["access_token"])
    assert status == 401  # the reuse revoked what the code produced


async def test_patient_launch_admin_api(smart: Smart) -> None:
    """A patient launch needs a known patient and uses the tenant's patient launch URL."""
    directory = await smart.admin("GET", f"/_sandbox/tenants/{TENANT_A}/directory")
    patient = directory["patients"][1]["id"]
    portal = "http://127.0.0.1:9/launch/patient/abc"
    await smart.admin("PATCH", f"/_sandbox/tenants/{TENANT_A}", {"patient_launch_url": portal})
    body = await smart.admin(
        "POST", f"/_sandbox/tenants/{TENANT_A}/launches", {"patient": patient, "persona": "patient"}
    )
    assert body["persona"] == "patient"
    assert body["patient"] == patient
    assert body["launch_url"].startswith(portal + "?")
    assert parse_qs(urlsplit(body["launch_url"]).query)["iss"] == [smart.base]
    path = f"{smart.ehr.url}/_sandbox/tenants/{TENANT_A}/launches"
    async with smart.http.post(path, json={"persona": "patient", "patient": "nope"}) as resp:
        assert resp.status == 422
    async with smart.http.post(path, json={"persona": "patient"}) as resp:
        assert resp.status == 422

"""Provider launch: PowerChart opens `/launch/provider[/<integration>]?iss=&launch=`; we run
the SMART EHR launch, find the appointment, find or create its meeting, and show the
clinician the visit with a live roster."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import structlog
from aiohttp import web

from libs.common.events import SmsRequestedV1, Topic, make_event
from libs.common.keys import appointment_key
from libs.common.outbox import enqueue
from libs.common.web import DB_POOL
from services.launch.fhir import Appointment, FhirClient, FhirError
from services.launch.graph import GraphError
from services.launch.integrations import Integration
from services.launch.meetings import Visit, create_meeting, record_visit
from services.launch.outbound import HTTP, OutboundError
from services.launch.pages import page, problem_page
from services.launch.sessions import current_session, set_session_cookie, start_session
from services.launch.smart import Pkce, SmartError, ehr_user_id
from services.launch.state import GRAPH, INTEGRATIONS, SMART, launch_settings

log = structlog.get_logger(__name__)

NOT_CONFIGURED = "This FHIR URL is not configured for the Teams connector; ask your administrator."


def _redirect_uri(request: web.Request) -> str:
    return f"{launch_settings(request).public_base_url.rstrip('/')}/launch/callback"


def _launch_parameters(request: web.Request) -> tuple[str, str]:
    iss, launch = request.query.get("iss", ""), request.query.get("launch", "")
    if not iss or not launch or len(iss) > 2048 or len(launch) > 1024:
        raise web.HTTPBadRequest(
            text="The EHR launch is missing iss or launch, or they are too long.",
        )
    if len(request.query.getall("iss")) > 1 or len(request.query.getall("launch")) > 1:
        raise web.HTTPBadRequest(text="The EHR launch repeats iss or launch.")
    return iss, launch


async def launch_provider(request: web.Request) -> web.StreamResponse:
    """Validates `iss` against configuration before any outbound request."""
    settings = launch_settings(request)
    try:
        iss, launch = _launch_parameters(request)
    except web.HTTPBadRequest as exc:
        return problem_page(400, "This launch is not valid", exc.text or "")
    directory = request.app[INTEGRATIONS]
    integration: Integration | None
    if "integration_id" in request.match_info:
        try:
            wanted = uuid.UUID(request.match_info["integration_id"])
        except ValueError:
            return problem_page(404, "Unknown integration", NOT_CONFIGURED)
        integration = await directory.by_id(wanted)
        if integration is not None and integration.fhir_base_url != iss:
            integration = None
    else:
        integration = await directory.by_fhir_base(iss)
    if integration is None:
        log.warning("launch refused: iss not configured", iss_length=len(iss))
        return problem_page(403, "This EHR is not set up", NOT_CONFIGURED)
    try:
        config = await request.app[SMART].discover(iss)
    except (SmartError, OutboundError) as exc:
        return problem_page(502, "The EHR could not be reached", str(exc))
    smart = request.app[SMART]
    state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    pkce = Pkce.new() if smart.uses_pkce(integration, config) else None
    sealed = settings.field_cipher().encrypt(
        orjson.dumps({"verifier": pkce.verifier if pkce else None, "nonce": nonce}).decode(),
        f"launch-state:{integration.integration_id}",
    )
    await request.app[DB_POOL].execute(
        "INSERT INTO launch_states (state_hash, integration_id, secrets, expires_at)"
        " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        _digest(state),
        integration.integration_id,
        sealed,
        settings.launch_state_ttl_s,
    )
    url = smart.authorize_url(
        integration,
        config,
        state=state,
        nonce=nonce,
        launch=launch,
        redirect_uri=_redirect_uri(request),
        pkce=pkce,
    )
    raise web.HTTPFound(url)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


async def launch_callback(request: web.Request) -> web.StreamResponse:
    settings = launch_settings(request)
    if "error" in request.query:
        return problem_page(
            400,
            "The EHR did not approve the sign-in",
            request.query.get("error_description", request.query["error"])[:300],
        )
    state, code = request.query.get("state", ""), request.query.get("code", "")
    if not state or not code or len(state) > 256 or len(code) > 4096:
        return problem_page(
            400, "This sign-in is not valid", "Launch the visit again from the EHR."
        )
    row = await request.app[DB_POOL].fetchrow(
        "DELETE FROM launch_states WHERE state_hash = $1 RETURNING integration_id, secrets,"
        " expires_at > now() AS fresh",
        _digest(state),
    )
    if row is None or not row["fresh"]:
        log.warning("launch callback refused: unknown, reused or expired state")
        return problem_page(
            400,
            "This sign-in has expired or was already used",
            "Launch the visit again from the EHR.",
        )
    integration = await request.app[INTEGRATIONS].by_id(row["integration_id"])
    if integration is None:
        return problem_page(403, "This EHR is not set up", NOT_CONFIGURED)
    cipher = settings.field_cipher()
    stored = orjson.loads(
        cipher.decrypt(row["secrets"], f"launch-state:{integration.integration_id}")
    )
    smart = request.app[SMART]
    try:
        config = await smart.discover(integration.fhir_base_url)
        tokens = await smart.exchange_code(
            integration,
            config,
            cipher,
            code=code,
            redirect_uri=_redirect_uri(request),
            verifier=stored["verifier"],
        )
        if not tokens.id_token:
            raise SmartError("The EHR did not say who signed in (no id_token).")
        claims = await smart.validate_id_token(
            integration, config, tokens.id_token, stored["nonce"]
        )
        user = ehr_user_id(claims, integration.fhir_base_url)
    except SmartError as exc:
        log.warning("launch refused", reason=str(exc))
        return problem_page(400, "The sign-in could not be completed", str(exc))
    fhir = FhirClient(request.app[HTTP], integration.fhir_base_url, tokens.access_token)
    try:
        candidates = await _find_appointments(fhir, tokens.encounter, tokens.patient)
    except FhirError as exc:
        return problem_page(502, "The appointment could not be read", str(exc))
    smart_tokens = {"access_token": tokens.access_token, "refresh_token": tokens.refresh_token}
    if not candidates:
        return problem_page(
            404,
            "No video visit found",
            "This patient has no video visit booked for today."
            " Book one in the EHR, then launch again.",
        )
    chosen = candidates[0] if len(candidates) == 1 else None
    key = None
    if chosen is not None:
        try:
            key = await _open_visit(request, integration, chosen, user)
        except VisitUnavailable as exc:
            return problem_page(503, "The meeting could not be prepared", str(exc))
    token = await start_session(
        request.app[DB_POOL],
        cipher,
        integration_id=integration.integration_id,
        ehr_user_id=user,
        appointment_key=key,
        candidates=[] if chosen else [_option(a, integration) for a in candidates],
        smart_tokens=smart_tokens,
        ttl_s=settings.provider_session_ttl_s,
    )
    response = web.HTTPFound("/visit" if chosen else "/visit/choose")
    set_session_cookie(response, token, settings.provider_session_ttl_s)
    raise response


async def _find_appointments(
    fhir: FhirClient, encounter: str | None, patient: str | None
) -> list[Appointment]:
    """Cerner puts no appointment in the launch context: go through the encounter, else
    search the patient's appointments around today."""
    found: list[Appointment] = []
    if encounter:
        found = await fhir.appointments_of_encounter(encounter)
    if not found and patient:
        found = await fhir.todays_appointments(patient, datetime.now(UTC))
    return [a for a in found if a.is_video_visit and a.status != "cancelled"]


class VisitUnavailable(Exception):
    """The meeting could not be created now; the clinician can retry."""


async def _open_visit(
    request: web.Request, integration: Integration, appointment: Appointment, user: str
) -> str:
    settings = launch_settings(request)
    key = appointment_key(
        settings.appointment_key_secret.get_secret_value(),
        integration.integration_id,
        appointment.id,
    )
    pool = request.app[DB_POOL]
    updated = await pool.execute(
        "UPDATE appointments SET ehr_user_id = $2, updated_at = now() WHERE appointment_key = $1",
        key,
        user,
    )
    if updated == "UPDATE 1":
        return key
    if appointment.start is None or appointment.end is None:
        raise VisitUnavailable("The appointment has no start or end time in the EHR.")
    visit = Visit(
        appointment_key=key,
        integration=integration,
        department=appointment.department(integration.department),
        starts_at=appointment.start,
        ends_at=appointment.end,
        time_zone=settings.default_time_zone,
        schedule_version=appointment.schedule_version,
    )
    try:
        meeting = await create_meeting(request.app[GRAPH], settings, visit)
    except GraphError as exc:
        raise VisitUnavailable(str(exc)) from None
    async with pool.acquire() as conn, conn.transaction():
        await record_visit(conn, settings, visit, meeting, ehr_user_id=user)
    return key


def _option(appointment: Appointment, integration: Integration) -> dict[str, str]:
    start = appointment.start.isoformat() if appointment.start else ""
    return {
        "id": appointment.id,
        "start": start,
        "department": appointment.department(integration.department),
    }


async def choose_page(request: web.Request) -> web.StreamResponse:
    settings = launch_settings(request)
    session = await current_session(request, request.app[DB_POOL], settings.field_cipher())
    if session is None:
        return problem_page(401, "Your session has ended", "Launch the visit again from the EHR.")
    if session.appointment_key:
        raise web.HTTPFound("/visit")
    # Only ids were kept; show times and departments from the EHR again would need a token
    # refresh, so the chooser lists the ids' appointments from our own rows where known.
    options = [
        {"id": cid, "when": f"Appointment {cid}", "department": ""} for cid in session.candidates
    ]
    return page("choose.html", options=options, csrf_token=session.csrf_token)


async def choose_submit(request: web.Request) -> web.StreamResponse:
    settings = launch_settings(request)
    pool = request.app[DB_POOL]
    session = await current_session(request, pool, settings.field_cipher())
    if session is None:
        return problem_page(401, "Your session has ended", "Launch the visit again from the EHR.")
    form = await request.post()
    if not secrets.compare_digest(str(form.get("csrf_token", "")), session.csrf_token):
        return problem_page(403, "This form has expired", "Reload the page and try again.")
    chosen = str(form.get("appointment", ""))
    if chosen not in {option["id"] for option in session.candidates}:
        return problem_page(
            400, "Choose one of the listed visits", "Reload the page and try again."
        )
    integration = await request.app[INTEGRATIONS].by_id(session.integration_id)
    if integration is None:
        return problem_page(403, "This EHR is not set up", NOT_CONFIGURED)
    tokens = await _session_tokens(request, session.token_hash, session.integration_id)
    fhir = FhirClient(request.app[HTTP], integration.fhir_base_url, tokens["access_token"] or "")
    try:
        appointment = await fhir.read_appointment(chosen)
    except FhirError as exc:
        return problem_page(502, "The appointment could not be read", str(exc))
    if appointment is None:
        return problem_page(404, "The appointment is gone", "Launch the visit again from the EHR.")
    try:
        key = await _open_visit(request, integration, appointment, session.ehr_user_id)
    except VisitUnavailable as exc:
        return problem_page(503, "The meeting could not be prepared", str(exc))
    await pool.execute(
        "UPDATE provider_sessions SET appointment_key = $2, candidates = NULL"
        " WHERE token_hash = $1",
        session.token_hash,
        key,
    )
    raise web.HTTPSeeOther("/visit")


async def _session_tokens(
    request: web.Request, token_hash: bytes, integration_id: uuid.UUID
) -> dict[str, Any]:
    sealed = await request.app[DB_POOL].fetchval(
        "SELECT smart_tokens FROM provider_sessions WHERE token_hash = $1", token_hash
    )
    tokens: dict[str, Any] = orjson.loads(
        launch_settings(request)
        .field_cipher()
        .decrypt(sealed, f"provider-session:{integration_id}")
    )
    return tokens


async def provider_page(request: web.Request) -> web.StreamResponse:
    settings = launch_settings(request)
    session = await current_session(request, request.app[DB_POOL], settings.field_cipher())
    if session is None or session.appointment_key is None:
        return problem_page(401, "Your session has ended", "Launch the visit again from the EHR.")
    row = await request.app[DB_POOL].fetchrow(
        "SELECT department, starts_at, ends_at, time_zone, status, join_web_url"
        " FROM appointments WHERE appointment_key = $1",
        session.appointment_key,
    )
    if row is None:
        return problem_page(404, "The visit is gone", "Launch the visit again from the EHR.")
    zone = ZoneInfo(row["time_zone"])
    when = (
        f"{row['starts_at'].astimezone(zone):%a %d %b %Y, %H:%M} to "
        f"{row['ends_at'].astimezone(zone):%H:%M} ({row['time_zone']})"
    )
    notice = "The join link was sent to the patient." if request.query.get("sent") == "1" else None
    return page(
        "provider.html",
        when=when,
        department=row["department"],
        visit_status=row["status"],
        join_url=row["join_web_url"],
        csrf_token=session.csrf_token,
        notice=notice,
    )


async def send_link(request: web.Request) -> web.StreamResponse:
    """Asks notify, through an event, to text the join link to the patient."""
    settings = launch_settings(request)
    pool = request.app[DB_POOL]
    session = await current_session(request, pool, settings.field_cipher())
    if session is None or session.appointment_key is None:
        return problem_page(401, "Your session has ended", "Launch the visit again from the EHR.")
    form = await request.post()
    if not secrets.compare_digest(str(form.get("csrf_token", "")), session.csrf_token):
        return problem_page(403, "This form has expired", "Reload the page and try again.")
    tenant_id = await pool.fetchval(
        "SELECT tenant_id FROM appointments WHERE appointment_key = $1", session.appointment_key
    )
    async with pool.acquire() as conn, conn.transaction():
        payload = SmsRequestedV1(
            integration_id=session.integration_id, requested_at=datetime.now(UTC)
        )
        await enqueue(
            conn, make_event(Topic.SMS_REQUESTED, str(tenant_id), session.appointment_key, payload)
        )
    log.info("patient link requested", appointment_key=session.appointment_key)
    raise web.HTTPSeeOther("/visit?sent=1")

"""Provider launch: PowerChart opens `/launch/provider[/<integration>]?iss=&launch=`; we run
the SMART EHR launch, find the appointment, find or create its meeting, and show the
clinician the visit with a live roster."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import structlog
from aiohttp import web

from libs.common.events import SmsRequestedV1, Topic, make_event
from libs.common.outbox import enqueue
from libs.common.web import DB_POOL, read_form
from services.launch.fhir import Appointment, FhirClient, FhirError
from services.launch.integrations import Integration
from services.launch.launch_flow import (
    NOT_CONFIGURED,
    VisitUnavailable,
    begin_launch,
    complete_launch,
    open_visit,
)
from services.launch.outbound import HTTP
from services.launch.pages import page, problem_page, redirect
from services.launch.patient_launch import finish_patient_launch
from services.launch.sessions import (
    current_session,
    new_session,
    session_token_hash,
    set_session_cookie,
    start_session,
)
from services.launch.smart import SmartError, ehr_user_id
from services.launch.state import INTEGRATIONS, field_cipher, launch_settings

log = structlog.get_logger(__name__)


async def launch_provider(request: web.Request) -> web.StreamResponse:
    """Validates `iss` against configuration before any outbound request."""
    return await begin_launch(request, "provider")


async def launch_callback(request: web.Request) -> web.StreamResponse:
    """The one SMART callback: the persona sealed with the state picks the flow."""
    completed = await complete_launch(request)
    if isinstance(completed, web.Response):
        return completed
    if completed.persona == "patient":
        return await finish_patient_launch(request, completed)
    settings = launch_settings(request)
    integration, tokens = completed.integration, completed.tokens
    try:
        user = ehr_user_id(completed.claims, integration.fhir_base_url)
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
    session = new_session(
        field_cipher(request),
        integration_id=integration.integration_id,
        ehr_user_id=user,
        candidates=[] if chosen else [_option(a, integration) for a in candidates],
        smart_tokens=smart_tokens,
        ttl_s=settings.provider_session_ttl_s,
    )
    if chosen is not None:
        try:
            await open_visit(request, integration, chosen, user, session)
        except VisitUnavailable as exc:
            return problem_page(503, "The meeting could not be prepared", str(exc))
    else:
        await start_session(request.app[DB_POOL], session, None)
    response = redirect("/visit" if chosen else "/visit/choose")
    set_session_cookie(response, session.token, settings.provider_session_ttl_s)
    return response


def form_token_matches(presented: object, expected: str) -> bool:
    """compare_digest refuses non-ASCII text: such a token was never issued."""
    return (
        isinstance(presented, str)
        and presented.isascii()
        and secrets.compare_digest(presented, expected)
    )


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


def _option(appointment: Appointment, integration: Integration) -> dict[str, str]:
    start = appointment.start.isoformat() if appointment.start else ""
    return {
        "id": appointment.id,
        "start": start,
        "department": appointment.department(integration.department),
    }


async def choose_page(request: web.Request) -> web.StreamResponse:
    session = await current_session(request, request.app[DB_POOL], field_cipher(request))
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
    pool = request.app[DB_POOL]
    session = await current_session(request, pool, field_cipher(request))
    if session is None:
        return problem_page(401, "Your session has ended", "Launch the visit again from the EHR.")
    form = await read_form(request)
    if not form_token_matches(form.get("csrf_token"), session.csrf_token):
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
    if tokens is None:
        return problem_page(401, "Your session has ended", "Launch the visit again from the EHR.")
    fhir = FhirClient(request.app[HTTP], integration.fhir_base_url, tokens["access_token"] or "")
    try:
        appointment = await fhir.read_appointment(chosen)
    except FhirError as exc:
        return problem_page(502, "The appointment could not be read", str(exc))
    if appointment is None:
        return problem_page(404, "The appointment is gone", "Launch the visit again from the EHR.")
    try:
        key = await open_visit(request, integration, appointment, session.ehr_user_id)
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
) -> dict[str, Any] | None:
    """The session's SMART tokens; None if it expired (and may be deleted) since it was read."""
    sealed = await request.app[DB_POOL].fetchval(
        "SELECT smart_tokens FROM provider_sessions WHERE token_hash = $1 AND expires_at > now()",
        token_hash,
    )
    if sealed is None:
        return None
    tokens: dict[str, Any] = orjson.loads(
        field_cipher(request).decrypt(sealed, f"provider-session:{integration_id}")
    )
    return tokens


# The session and its visit in one read: the page is opened once per launch, right after it.
_PROVIDER_PAGE = (
    "SELECT s.csrf_token, a.appointment_key, a.department, a.starts_at, a.ends_at,"
    " a.time_zone, a.status, a.join_web_url FROM provider_sessions s"
    " LEFT JOIN appointments a USING (appointment_key)"
    " WHERE s.token_hash = $1 AND s.expires_at > now() AND s.appointment_key IS NOT NULL"
)


async def provider_page(request: web.Request) -> web.StreamResponse:
    token_hash = session_token_hash(request)
    row = None
    if token_hash is not None:
        row = await request.app[DB_POOL].fetchrow(_PROVIDER_PAGE, token_hash)
    if row is None:
        return problem_page(401, "Your session has ended", "Launch the visit again from the EHR.")
    if row["appointment_key"] is None:
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
        csrf_token=row["csrf_token"],
        notice=notice,
    )


async def send_link(request: web.Request) -> web.StreamResponse:
    """Asks notify, through an event, to text the join link to the patient."""
    pool = request.app[DB_POOL]
    session = await current_session(request, pool, field_cipher(request))
    if session is None or session.appointment_key is None:
        return problem_page(401, "Your session has ended", "Launch the visit again from the EHR.")
    form = await read_form(request)
    if not form_token_matches(form.get("csrf_token"), session.csrf_token):
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

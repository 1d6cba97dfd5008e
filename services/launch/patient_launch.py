"""Patient launch: the patient portal opens `/launch/patient/<integration>?iss=&launch=` (the
patient-facing SMART app, Cerner's patient persona). After the shared SMART steps we find the
patient's own video visit today and send them to its `/join/<token>` link, so they land on
the same pre-join page as from the SMS. Nothing about the patient is stored or logged: the
token's patient context is used for one FHIR search and then dropped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import structlog
from aiohttp import web

from libs.common.web import DB_POOL
from services.launch.fhir import Appointment, FhirClient, FhirError
from services.launch.launch_flow import (
    CompletedLaunch,
    VisitUnavailable,
    begin_launch,
    open_visit,
)
from services.launch.meetings import Visit, join_link
from services.launch.outbound import HTTP
from services.launch.pages import problem_page
from services.launch.settings import LaunchSettings
from services.launch.smart import SmartError, patient_in_context
from services.launch.state import launch_settings

log = structlog.get_logger(__name__)

SOON = timedelta(hours=1)
NO_VISIT_TODAY = (
    "You have no video visit booked for today. If you expected one, contact your clinic."
)


async def launch_patient(request: web.Request) -> web.StreamResponse:
    """Validates `iss` against the integration before any outbound request."""
    return await begin_launch(request, "patient")


def todays_visit(
    settings: LaunchSettings, found: list[Appointment], patient: str, now: datetime
) -> Appointment | None:
    """The patient's own booked video visit today (or starting within the hour, across
    midnight) that is not over yet, earliest first.
    Anything naming another patient is dropped, whatever the EHR returned."""
    zone = ZoneInfo(settings.default_time_zone)
    grace = timedelta(minutes=settings.join_grace_minutes)
    today = now.astimezone(zone).date()
    usable = [
        a
        for a in found
        if a.reference_to("Patient") == patient
        and a.is_video_visit
        and a.status != "cancelled"
        and a.times is not None
        and a.times[1] + grace > now
        and (a.times[0].astimezone(zone).date() == today or a.times[0] <= now + SOON)
    ]
    return min(usable, key=lambda a: (a.start or now, a.id)) if usable else None


async def finish_patient_launch(
    request: web.Request, completed: CompletedLaunch
) -> web.StreamResponse:
    settings = launch_settings(request)
    integration, tokens = completed.integration, completed.tokens
    try:
        patient = patient_in_context(completed.claims, integration.fhir_base_url, tokens.patient)
    except SmartError as exc:
        log.warning("patient launch refused", reason=str(exc))
        return problem_page(400, "The sign-in could not be completed", str(exc))
    now = datetime.now(UTC)
    fhir = FhirClient(request.app[HTTP], integration.fhir_base_url, tokens.access_token)
    try:
        appointment = todays_visit(
            settings, await fhir.todays_appointments(patient, now), patient, now
        )
    except FhirError as exc:
        return problem_page(502, "Your visit could not be read", str(exc))
    if appointment is None:
        return problem_page(404, "No video visit today", NO_VISIT_TODAY)
    try:
        key = await open_visit(request, integration, appointment, None)
    except VisitUnavailable:
        return problem_page(
            503, "Your visit is not ready yet", "Try again in a minute from your patient portal."
        )
    row = await request.app[DB_POOL].fetchrow(
        "SELECT status, department, starts_at, ends_at, time_zone, schedule_version"
        " FROM appointments WHERE appointment_key = $1",
        key,
    )
    if row is None or row["status"] == "cancelled":
        return problem_page(410, "This visit was cancelled", "Contact your clinic to book again.")
    visit = Visit.of_row(key, integration, row)
    log.info("patient launch to join page", appointment_key=key)
    raise web.HTTPSeeOther(join_link(settings, visit))

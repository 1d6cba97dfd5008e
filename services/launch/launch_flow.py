"""The SMART EHR launch steps both personas share: refuse an unconfigured `iss` before any
outbound request, discovery, a single-use state with PKCE and nonce, the callback's code
exchange and id_token validation, and opening the visit's meeting."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from libs.common.keys import appointment_key
from libs.common.web import DB_POOL
from services.launch.fhir import Appointment
from services.launch.graph import GraphError
from services.launch.integrations import Integration
from services.launch.meeting_preparation import meeting_ready
from services.launch.meetings import Visit, create_meeting, record_visit
from services.launch.outbound import OutboundError
from services.launch.pages import problem_page, redirect
from services.launch.sessions import NewSession, record_clinician_starting_session, start_session
from services.launch.smart import Persona, Pkce, SmartError, TokenResponse
from services.launch.state import GRAPH, INTEGRATIONS, SMART, field_cipher, launch_settings

log = structlog.get_logger(__name__)

NOT_CONFIGURED = "This FHIR URL is not configured for the Teams connector; ask your administrator."
# Unicode's Cc category, which is closed: U+0000-U+001F and U+007F-U+009F. One regex search
# instead of a unicodedata lookup per character in Python.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def redirect_uri(request: web.Request) -> str:
    """One callback for both personas; the persona travels sealed with the state."""
    return f"{launch_settings(request).public_base_url.rstrip('/')}/launch/callback"


def _launch_parameters(request: web.Request) -> tuple[str, str]:
    iss, launch = request.query.get("iss", ""), request.query.get("launch", "")
    if not iss or not launch or len(iss) > 2048 or len(launch) > 1024:
        raise web.HTTPBadRequest(
            text="The EHR launch is missing iss or launch, or they are too long.",
        )
    if len(request.query.getall("iss")) > 1 or len(request.query.getall("launch")) > 1:
        raise web.HTTPBadRequest(text="The EHR launch repeats iss or launch.")
    if _CONTROL_CHARACTER.search(launch):
        # An EHR's launch id is opaque but never holds NUL, CR/LF or other control
        # characters; passing them on would only store a state for a launch that cannot be.
        raise web.HTTPBadRequest(text="The EHR launch parameter holds control characters.")
    return iss, launch


async def begin_launch(request: web.Request, persona: Persona) -> web.StreamResponse:
    """`/launch/<persona>[/<integration>]?iss=&launch=`: validates `iss` against
    configuration before any outbound request, then redirects to the EHR's authorize."""
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
        log.warning("launch refused: iss not configured", persona=persona, iss_length=len(iss))
        return problem_page(403, "This EHR is not set up", NOT_CONFIGURED)
    smart = request.app[SMART]
    try:
        config = await smart.discover(iss)
    except (SmartError, OutboundError) as exc:
        return problem_page(502, "The EHR could not be reached", str(exc))
    state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    pkce = Pkce.new() if smart.uses_pkce(integration, config) else None
    sealed = field_cipher(request).encrypt(
        orjson.dumps(
            {"verifier": pkce.verifier if pkce else None, "nonce": nonce, "persona": persona}
        ).decode(),
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
        redirect_uri=redirect_uri(request),
        pkce=pkce,
        persona=persona,
    )
    return redirect(url)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@dataclass(frozen=True)
class CompletedLaunch:
    """A callback whose state, code and id_token all checked out."""

    persona: Persona
    integration: Integration
    tokens: TokenResponse
    claims: dict[str, Any]


async def complete_launch(request: web.Request) -> CompletedLaunch | web.Response:
    """Consumes the single-use state, exchanges the code and validates the id_token; a
    problem page when any of it fails."""
    if "error" in request.query:
        return problem_page(
            400,
            "The EHR did not approve the sign-in",
            request.query.get("error_description", request.query["error"])[:300],
        )
    state, code = request.query.get("state", ""), request.query.get("code", "")
    if not state or not code or len(state) > 256 or len(code) > 4096:
        return problem_page(400, "This sign-in is not valid", "Launch the visit again.")
    row = await request.app[DB_POOL].fetchrow(
        "DELETE FROM launch_states WHERE state_hash = $1 RETURNING integration_id, secrets,"
        " expires_at > now() AS fresh",
        _digest(state),
    )
    if row is None or not row["fresh"]:
        log.warning("launch callback refused: unknown, reused or expired state")
        return problem_page(
            400, "This sign-in has expired or was already used", "Launch the visit again."
        )
    integration = await request.app[INTEGRATIONS].by_id(row["integration_id"])
    if integration is None:
        return problem_page(403, "This EHR is not set up", NOT_CONFIGURED)
    cipher = field_cipher(request)
    stored = orjson.loads(
        cipher.decrypt(row["secrets"], f"launch-state:{integration.integration_id}")
    )
    # States sealed before the patient launch existed carry no persona: they are provider's.
    persona: Persona = "patient" if stored.get("persona") == "patient" else "provider"
    smart = request.app[SMART]
    try:
        config = await smart.discover(integration.fhir_base_url)
        tokens = await smart.exchange_code(
            integration,
            config,
            cipher,
            code=code,
            redirect_uri=redirect_uri(request),
            verifier=stored["verifier"],
        )
        if not tokens.id_token:
            raise SmartError("The EHR did not say who signed in (no id_token).")
        claims = await smart.validate_id_token(
            integration, config, tokens.id_token, stored["nonce"]
        )
    except SmartError as exc:
        log.warning("launch refused", persona=persona, reason=str(exc))
        return problem_page(400, "The sign-in could not be completed", str(exc))
    return CompletedLaunch(persona, integration, tokens, claims)


class VisitUnavailable(Exception):
    """The meeting could not be created now; the user can retry."""


async def open_visit(
    request: web.Request,
    integration: Integration,
    appointment: Appointment,
    user: str | None,
    session: NewSession | None = None,
) -> str:
    """The appointment key of a known appointment, or of one whose meeting is created now and
    recorded with `appointment-created`. `user` is the clinician's EHR user id; a patient is
    not an EHR user, so a patient launch passes None and nothing about them is stored.
    `session`, the clinician's new session (for `user`), is started for this visit once the
    visit has its meeting: in the statement that records the clinician when it already has
    one."""
    settings = launch_settings(request)
    key = appointment_key(
        settings.appointment_key_secret.get_secret_value(),
        integration.integration_id,
        appointment.id,
    )
    pool = request.app[DB_POOL]
    if session is not None and session.ehr_user_id != user:
        raise ValueError("a session is for the clinician who launched")
    if user is None:
        # A patient's launch goes on to the join page, whose Join prepares a missing meeting.
        known = await pool.fetchval("SELECT 1 FROM appointments WHERE appointment_key = $1", key)
    else:
        if session is None:
            has_meeting = await pool.fetchval(
                "UPDATE appointments SET ehr_user_id = $2, updated_at = now()"
                " WHERE appointment_key = $1 RETURNING meeting_id IS NOT NULL",
                key,
                user,
            )
        else:
            has_meeting = await record_clinician_starting_session(pool, key, session)
            if has_meeting:
                return key  # the session was started in the same statement
        if has_meeting is False and not await meeting_ready(request.app, key):
            # Booked through the feed and not prepared yet: the clinician needs it now.
            raise VisitUnavailable("Microsoft Teams could not prepare the meeting yet.")
        known = has_meeting is not None
    if not known:
        times = appointment.times
        if times is None:
            raise VisitUnavailable("The appointment's start or end time in the EHR is not valid.")
        visit = Visit(
            appointment_key=key,
            integration=integration,
            department=appointment.department(integration.department),
            starts_at=times[0],
            ends_at=times[1],
            time_zone=settings.default_time_zone,
            schedule_version=appointment.schedule_version,
        )
        try:
            meeting = await create_meeting(request.app[GRAPH], settings, visit)
        except GraphError as exc:
            raise VisitUnavailable(str(exc)) from None
        # The session, when there is one, is started in the statement recording the visit.
        await record_visit(pool, settings, visit, meeting, ehr_user_id=user, session=session)
    elif session is not None:
        await start_session(pool, session, key)
    return key

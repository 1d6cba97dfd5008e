"""Patient join: `/join/<token>` from the SMS. No account, no sign-in, no provider details.
Opening the link, and pressing Join, record the patient's arrival in the lobby once per
device and publish `patient-joined`, from `lobby_opens_minutes` before the start: earlier, the
page says when to come back and records nothing (the confirmation carries the link days
ahead; a patient checking it then is not waiting). The link's signature is checked before any
database work; whether it still opens the visit (not cancelled, not past its current end plus
grace) comes from the visit's row, read once per open anyway."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

import asyncpg
import structlog
from aiohttp import web

from libs.common.events import PatientJoinedV1, Topic, encode_event, make_event
from libs.common.web import DB_POOL
from services.launch import join_tokens
from services.launch.lobby_batches import LOBBY, Arrival
from services.launch.meeting_preparation import meeting_ready
from services.launch.pages import page, problem_page
from services.launch.settings import LaunchSettings
from services.launch.state import launch_settings

log = structlog.get_logger(__name__)
DEVICE_COOKIE = "visit_device"


def patient_pseudonym(settings: LaunchSettings, appointment_key: str, device: str) -> str:
    digest = hmac.new(
        settings.join_token_secret.get_secret_value().encode(),
        f"patient\x1f{appointment_key}\x1f{device}".encode(),
        hashlib.sha256,
    ).hexdigest()
    return f"pt_{digest[:20]}"


def _appointment(request: web.Request) -> str | web.Response:
    """The appointment a genuine link names, checked before any database work."""
    settings = launch_settings(request)
    try:
        return join_tokens.verify(
            settings.join_token_secret.get_secret_value(), request.match_info["token"]
        )
    except join_tokens.JoinTokenError as exc:
        log.info("join link refused", reason=str(exc))
        return problem_page(404, "This link does not work", str(exc))


def closed(status: str, ends_at: datetime, now: datetime, grace: timedelta) -> web.Response | None:
    """Why a genuine link no longer opens its visit, from the visit's current row; None while
    it does. A reschedule moves `ends_at` either way and sends no new link, so the end signed
    into the token at booking is not what counts: the link of a visit moved later works until
    its new end plus grace, and that of a visit moved earlier stops then."""
    if status == "cancelled":
        return problem_page(
            410, "This visit was cancelled", "Contact your clinic to book a new time."
        )
    if now > ends_at + grace:
        log.info("join link refused", reason="visit over")
        return problem_page(
            410, "This link does not work", "This visit is over, so its link has expired."
        )
    return None


def _visit(row: asyncpg.Record | None, grace: timedelta) -> asyncpg.Record | web.Response:
    if row is None:
        return problem_page(404, "This link does not work", "We could not find this visit.")
    return closed(row["status"], row["ends_at"], datetime.now(UTC), grace) or row


def _arrival(key: str, tenant_id: str, participant: str) -> Arrival:
    """The first open from a device: its lobby arrival and `patient-joined`, written in one
    statement (lobby_batches), as atomic as outbox.enqueue's transaction (the outbox row is
    written if and only if the arrival is; the outbox trigger wakes the relay as usual)."""
    now = datetime.now(UTC)
    payload = PatientJoinedV1(participant=participant, lobby_entered_at=now)
    event = make_event(Topic.PATIENT_JOINED, tenant_id, key, payload)
    return Arrival(key, participant, now, event.event_id, event.type, encode_event(event))


class Arrived(NamedTuple):
    row: asyncpg.Record
    device: str
    fresh: bool
    # When the visit's waiting room opens, while it is not open yet; None once it is.
    opens_at: datetime | None


async def _arrive(request: web.Request) -> Arrived | web.Response:
    """Checks the link, finds the visit and records this device's arrival (first open only,
    and only once the waiting room is open, `lobby_opens_minutes` before the start): the
    visit's row, the device, whether it is new and when the waiting room opens, if not yet.
    One read per open of the link, the visit and whether this device is in its lobby
    already: patients open the link several times (the SMS, then Join, then again after a
    reload), and only the first open from a device writes. The visit's current status and
    end decide whether the link still opens it (see `closed`). Both statements are shared
    with concurrent joins (lobby_batches)."""
    key = _appointment(request)
    if isinstance(key, web.Response):
        return key
    settings = launch_settings(request)
    device, fresh = _device(request)
    participant = patient_pseudonym(settings, key, device)
    lobby = request.app[LOBBY]
    grace = timedelta(minutes=settings.join_grace_minutes)
    row = _visit(await lobby.visit(key, participant), grace)
    if isinstance(row, web.Response):
        return row
    opens_at = row["starts_at"] - timedelta(minutes=settings.lobby_opens_minutes)
    if datetime.now(UTC) < opens_at:
        return Arrived(row, device, fresh, opens_at)
    if not row["arrived"]:
        await lobby.arrive(_arrival(key, row["tenant_id"], participant))
    return Arrived(row, device, fresh, None)


async def _prepared_meeting_url(request: web.Request, key: str) -> str | None:
    """The patient pressed Join before the worker prepared the meeting: prepare it now."""
    if not await meeting_ready(request.app, key):
        return None
    url = await request.app[DB_POOL].fetchval(
        "SELECT patient_join_url FROM appointments WHERE appointment_key = $1", key
    )
    return None if url is None else str(url)


def _device(request: web.Request) -> tuple[str, bool]:
    device = request.cookies.get(DEVICE_COOKIE, "")
    if 20 <= len(device) <= 64 and device.replace("-", "").replace("_", "").isalnum():
        return device, False
    return secrets.token_urlsafe(24), True


def _remember(response: web.StreamResponse, device: str, fresh: bool) -> None:
    if fresh:
        response.set_cookie(
            DEVICE_COOKIE,
            device,
            max_age=86400,
            httponly=True,
            secure=True,
            samesite="Lax",
            path="/join",
        )


async def join_page(request: web.Request) -> web.StreamResponse:
    arrived = await _arrive(request)
    if isinstance(arrived, web.Response):
        return arrived
    row, device, fresh, opens_at = arrived
    zone = ZoneInfo(row["time_zone"])
    response = page(
        "prejoin.html",
        organisation=row["organisation_name"] or "your clinic",
        when=f"{row['starts_at'].astimezone(zone):%A %d %B, %H:%M} ({row['time_zone']})",
        token=request.match_info["token"],
        opens=f"{opens_at.astimezone(zone):%A %d %B, %H:%M}" if opens_at else None,
    )
    _remember(response, device, fresh)
    return response


async def join_enter(request: web.Request) -> web.StreamResponse:
    arrived = await _arrive(request)
    if isinstance(arrived, web.Response):
        return arrived
    row, device, fresh, opens_at = arrived
    if opens_at is not None:
        # Too early to wait in the lobby: back to the page, which says from when.
        early = web.HTTPSeeOther(f"/join/{request.match_info['token']}")
        _remember(early, device, fresh)
        raise early
    meeting_url = row["patient_join_url"] or await _prepared_meeting_url(
        request, row["appointment_key"]
    )
    if meeting_url is None:
        not_ready = problem_page(503, "The visit is not ready yet", "Try again in a minute.")
        _remember(not_ready, device, fresh)
        return not_ready
    response = web.HTTPSeeOther(meeting_url)
    _remember(response, device, fresh)
    raise response

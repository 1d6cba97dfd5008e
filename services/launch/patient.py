"""Patient join: `/join/<token>` from the SMS. No account, no sign-in, no provider details.
Opening the link, and pressing Join, record the patient's arrival in the lobby once per
device and publish `patient-joined`."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import asyncpg
import structlog
from aiohttp import web

from libs.common.events import PatientJoinedV1, Topic, make_event
from libs.common.outbox import enqueue
from libs.common.web import DB_POOL
from services.launch import join_tokens
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


async def _visit(request: web.Request) -> tuple[str, asyncpg.Record] | web.Response:
    settings = launch_settings(request)
    token = request.match_info["token"]
    try:
        key = join_tokens.verify(
            settings.join_token_secret.get_secret_value(), token, datetime.now(UTC)
        )
    except join_tokens.JoinTokenError as exc:
        log.info("join link refused", reason=str(exc))
        return problem_page(
            410 if "expired" in str(exc) else 404, "This link does not work", str(exc)
        )
    row = await request.app[DB_POOL].fetchrow(
        "SELECT a.tenant_id, a.status, a.starts_at, a.time_zone, a.patient_join_url,"
        " i.organisation_name FROM appointments a LEFT JOIN integrations i USING (integration_id)"
        " WHERE a.appointment_key = $1",
        key,
    )
    if row is None:
        return problem_page(404, "This link does not work", "We could not find this visit.")
    if row["status"] == "cancelled":
        return problem_page(
            410, "This visit was cancelled", "Contact your clinic to book a new time."
        )
    return key, row


async def _record_arrival(request: web.Request, key: str, tenant_id: str, device: str) -> None:
    settings = launch_settings(request)
    participant = patient_pseudonym(settings, key, device)
    now = datetime.now(UTC)
    async with request.app[DB_POOL].acquire() as conn, conn.transaction():
        status = await conn.execute(
            "INSERT INTO lobby_arrivals (appointment_key, participant, arrived_at)"
            " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            key,
            participant,
            now,
        )
        if status == "INSERT 0 1":
            payload = PatientJoinedV1(participant=participant, lobby_entered_at=now)
            await enqueue(conn, make_event(Topic.PATIENT_JOINED, tenant_id, key, payload))


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
    found = await _visit(request)
    if isinstance(found, web.Response):
        return found
    key, row = found
    device, fresh = _device(request)
    await _record_arrival(request, key, row["tenant_id"], device)
    zone = ZoneInfo(row["time_zone"])
    response = page(
        "prejoin.html",
        organisation=row["organisation_name"] or "your clinic",
        when=f"{row['starts_at'].astimezone(zone):%A %d %B, %H:%M} ({row['time_zone']})",
        token=request.match_info["token"],
    )
    _remember(response, device, fresh)
    return response


async def join_enter(request: web.Request) -> web.StreamResponse:
    found = await _visit(request)
    if isinstance(found, web.Response):
        return found
    key, row = found
    if not row["patient_join_url"]:
        return problem_page(503, "The visit is not ready yet", "Try again in a minute.")
    device, fresh = _device(request)
    await _record_arrival(request, key, row["tenant_id"], device)
    response = web.HTTPSeeOther(row["patient_join_url"])
    _remember(response, device, fresh)
    raise response

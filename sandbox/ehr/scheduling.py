"""Book, reschedule and cancel appointments inside the stand-in (and fire the feed)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field

from sandbox.ehr import data as d
from sandbox.ehr.state import Sandbox, TenantState
from sandbox.ehr.webhooks import WebhookDispatcher, build_event


class SchedulingError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BookRequest(BaseModel):
    patient: str
    practitioner: str
    location: str
    start: datetime
    minutes: int = Field(default=20, ge=5, le=480)
    video: bool = True


class RescheduleRequest(BaseModel):
    start: datetime
    minutes: int | None = Field(default=None, ge=5, le=480)


class CancelRequest(BaseModel):
    reason: str = "pat"


def _now(sandbox: Sandbox) -> datetime:
    return datetime.fromtimestamp(sandbox.clock(), UTC)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def patient_phone(tenant: TenantState, appt: d.Resource) -> str | None:
    pid = d.participant_id(appt, "Patient")
    pat = tenant.data.get("Patient", pid) if pid else None
    for tel in (pat or {}).get("telecom", []):
        if tel.get("system") in ("phone", "sms") and tel.get("use") == "mobile":
            return str(tel["value"])
    return None


def bump_version(appt: d.Resource, now: datetime) -> None:
    meta = appt.setdefault("meta", {})
    meta["versionId"] = str(int(meta.get("versionId", "0")) + 1)
    meta["lastUpdated"] = d.iso(now)


def _require(tenant: TenantState, rtype: str, rid: str) -> d.Resource:
    res = tenant.data.get(rtype, rid)
    if res is None:
        raise SchedulingError(404, f"{rtype}/{rid} not found in tenant {tenant.guid}")
    return res


def notify(
    sandbox: Sandbox,
    dispatcher: WebhookDispatcher,
    tenant: TenantState,
    event: str,
    appt: d.Resource,
    previous: dict[str, Any] | None = None,
) -> None:
    out = build_event(
        tenant, event, copy.deepcopy(appt), patient_phone(tenant, appt), sandbox.clock(), previous
    )
    dispatcher.enqueue(tenant, out)


def book(
    sandbox: Sandbox, dispatcher: WebhookDispatcher, tenant: TenantState, req: BookRequest
) -> d.Resource:
    pat = _require(tenant, "Patient", req.patient)
    prac = _require(tenant, "Practitioner", req.practitioner)
    loc = _require(tenant, "Location", req.location)
    appt = d.appointment(
        tenant=tenant.guid,
        aid=tenant.data.booking_id(),
        start=_utc(req.start),
        minutes=req.minutes,
        patient_res=pat,
        practitioner_res=prac,
        location_res=loc,
        video=req.video,
        updated=_now(sandbox),
    )
    tenant.data.add(appt)
    tenant.data.add(d.encounter(tenant.data.booking_id(), appt, req.video))
    notify(sandbox, dispatcher, tenant, "booked", appt)
    return appt


def _open_appointment(tenant: TenantState, appt_id: str) -> d.Resource:
    appt = _require(tenant, "Appointment", appt_id)
    if appt["status"] == "cancelled":
        raise SchedulingError(409, f"Appointment/{appt_id} is cancelled")
    return appt


def reschedule(
    sandbox: Sandbox,
    dispatcher: WebhookDispatcher,
    tenant: TenantState,
    appt_id: str,
    req: RescheduleRequest,
) -> d.Resource:
    appt = _open_appointment(tenant, appt_id)
    previous = {"start": appt["start"], "end": appt["end"]}
    minutes = req.minutes or int(appt.get("minutesDuration", 20))
    start = _utc(req.start)
    appt["start"] = d.iso(start)
    appt["end"] = d.iso(start + timedelta(minutes=minutes))
    appt["minutesDuration"] = minutes
    bump_version(appt, _now(sandbox))
    enc = tenant.data.encounter_for(appt_id)
    if enc is not None:
        enc["period"] = {"start": appt["start"]}
    notify(sandbox, dispatcher, tenant, "rescheduled", appt, previous)
    return appt


def cancel(
    sandbox: Sandbox,
    dispatcher: WebhookDispatcher,
    tenant: TenantState,
    appt_id: str,
    req: CancelRequest,
) -> d.Resource:
    appt = _open_appointment(tenant, appt_id)
    appt["status"] = "cancelled"
    appt["cancelationReason"] = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason",
                "code": req.reason,
            }
        ]
    }
    bump_version(appt, _now(sandbox))
    enc = tenant.data.encounter_for(appt_id)
    if enc is not None:
        enc["status"] = "cancelled"
    notify(sandbox, dispatcher, tenant, "cancelled", appt)
    return appt


def todays_appointments(sandbox: Sandbox, tenant: TenantState) -> list[d.Resource]:
    today = _now(sandbox).date()
    appts = [
        a
        for a in tenant.data.resources["Appointment"].values()
        if d.parse_iso(a["start"]).date() == today
    ]
    return sorted(appts, key=lambda a: (a["start"], a["id"]))

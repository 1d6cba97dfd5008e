"""A tiny "PowerChart": today's video visits per tenant; the Teams button does an EHR launch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from html import escape
from urllib.parse import quote

from aiohttp import web
from pydantic import ValidationError

from sandbox.ehr import scheduling
from sandbox.ehr.admin import LaunchRequest, directory, mint_launch_for
from sandbox.ehr.app_keys import DISPATCHER, SANDBOX
from sandbox.ehr.data import is_video_visit, parse_iso, participant_id
from sandbox.ehr.oauth import tenant_or_404
from sandbox.ehr.state import TenantState

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#eef1f4;color:#1d2733}
header{background:#1f4e79;color:#fff;padding:10px 18px}header a{color:#fff}
main{padding:16px 18px}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #d5dbe1;padding:6px 8px;text-align:left;font-size:14px}
th{background:#dfe6ed}.cancelled{color:#8a8f96;text-decoration:line-through}
button{cursor:pointer}.teams{background:#4b53bc;color:#fff;border:0;padding:5px 12px;
border-radius:3px}form.inline{display:inline}.msg{background:#fff3cd;padding:8px;margin:8px 0}
fieldset{background:#fff;margin-top:16px;border:1px solid #c5ccd3}
"""


def page(title: str, body: str) -> web.Response:
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><header><strong>PowerChart (sandbox)</strong> "
        f"&middot; <a href='/powerchart'>tenants</a></header><main>{body}</main></body></html>"
    )
    return web.Response(text=doc, content_type="text/html")


async def index(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    items = "".join(
        f"<li><a href='/powerchart/{t.guid}'>{escape(t.spec.name)}</a> <code>{t.guid}</code></li>"
        for t in sandbox.tenants.values()
    )
    return page("PowerChart", f"<h1>Tenants</h1><ul>{items}</ul>")


def _name(tenant: TenantState, rtype: str, rid: str | None) -> str:
    res = tenant.data.get(rtype, rid) if rid else None
    if res is None:
        return ""
    return str(res["name"] if rtype == "Location" else res["name"][0]["text"])


def _options(items: list[dict[str, str]]) -> str:
    return "".join(f"<option value='{i['id']}'>{escape(i['name'])}</option>" for i in items)


async def tenant_page(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    tenant = tenant_or_404(request)
    base = f"/powerchart/{tenant.guid}"
    rows = []
    for appt in scheduling.todays_appointments(sandbox, tenant):
        if not is_video_visit(appt):
            continue
        aid = appt["id"]
        cls = " class='cancelled'" if appt["status"] == "cancelled" else ""
        start = parse_iso(appt["start"]).strftime("%H:%M")
        actions = ""
        if appt["status"] != "cancelled":
            actions = (
                f"<form class='inline' method='post' action='{base}/launch'>"
                f"<input type='hidden' name='appointment' value='{aid}'>"
                f"<button class='teams' data-appointment='{aid}'>Teams</button></form> "
                f"<form class='inline' method='post' action='{base}/appointments/{aid}/reschedule'>"
                f"<input type='time' name='time' value='{start}' required>"
                f"<button>Reschedule</button></form> "
                f"<form class='inline' method='post' action='{base}/appointments/{aid}/cancel'>"
                f"<button>Cancel</button></form>"
            )
        rows.append(
            f"<tr{cls}><td>{start} UTC</td>"
            + "".join(
                f"<td>{escape(_name(tenant, kind, participant_id(appt, kind)))}</td>"
                for kind in ("Patient", "Practitioner", "Location")
            )
            + f"<td>{escape(appt['status'])}</td><td>{actions}</td></tr>"
        )
    msg = request.query.get("msg")
    notice = f"<div class='msg'>{escape(msg)}</div>" if msg else ""
    if not tenant.spec.launch_url:
        notice += (
            "<div class='msg'>No provider launch URL is configured for this tenant: set it with "
            f"<code>PATCH /_sandbox/tenants/{tenant.guid}</code>.</div>"
        )
    dirs = directory(tenant)
    today = datetime.fromtimestamp(sandbox.clock(), UTC).date().isoformat()
    book_form = (
        f"<fieldset><legend>Book a video visit ({today})</legend>"
        f"<form method='post' action='{base}/book'>"
        f"Patient <select name='patient'>{_options(dirs['patients'])}</select> "
        f"Provider <select name='practitioner'>{_options(dirs['practitioners'])}</select> "
        f"Department <select name='location'>{_options(dirs['locations'])}</select> "
        "Time (UTC) <input type='time' name='time' value='20:00' required> "
        "Minutes <input type='number' name='minutes' value='20' min='5' max='480'> "
        "<button>Book</button></form></fieldset>"
    )
    body = (
        f"<h1>{escape(tenant.spec.name)}</h1><p>FHIR base <code>{escape(tenant.fhir_base)}</code>"
        f"</p>{notice}<h2>Today's video visits</h2><table><tr><th>Time</th><th>Patient</th>"
        f"<th>Provider</th><th>Department</th><th>Status</th><th></th></tr>{''.join(rows)}"
        f"</table>{book_form}"
    )
    return page(tenant.spec.name, body)


def _back(tenant: TenantState, msg: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/powerchart/{tenant.guid}?msg={quote(msg)}")


def _today_at(request: web.Request, hhmm: str) -> datetime:
    sandbox = request.app[SANDBOX]
    try:
        hour, minute = (int(x) for x in hhmm.split(":")[:2])
    except ValueError:
        raise web.HTTPBadRequest(text="time must be HH:MM") from None
    day = datetime.fromtimestamp(sandbox.clock(), UTC).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return day + timedelta(hours=hour, minutes=minute)


async def launch(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    form = await request.post()
    req = LaunchRequest(appointment=str(form.get("appointment", "")))
    result = mint_launch_for(request.app[SANDBOX], tenant, req)
    if not result["launch_url"]:
        raise _back(tenant, "Cannot launch: no provider launch URL configured.")
    raise web.HTTPSeeOther(result["launch_url"])


async def book(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    form = await request.post()
    try:
        req = scheduling.BookRequest(
            patient=str(form.get("patient", "")),
            practitioner=str(form.get("practitioner", "")),
            location=str(form.get("location", "")),
            start=_today_at(request, str(form.get("time", ""))),
            minutes=int(str(form.get("minutes", "20")) or 20),
        )
        appt = scheduling.book(request.app[SANDBOX], request.app[DISPATCHER], tenant, req)
    except (ValidationError, ValueError, scheduling.SchedulingError) as exc:
        raise _back(tenant, f"Booking failed: {exc}") from None
    raise _back(tenant, f"Booked Appointment/{appt['id']}.")


async def reschedule(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    form = await request.post()
    req = scheduling.RescheduleRequest(start=_today_at(request, str(form.get("time", ""))))
    try:
        scheduling.reschedule(
            request.app[SANDBOX], request.app[DISPATCHER], tenant, request.match_info["id"], req
        )
    except scheduling.SchedulingError as exc:
        raise _back(tenant, exc.message) from None
    raise _back(tenant, f"Rescheduled Appointment/{request.match_info['id']}.")


async def cancel(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    try:
        scheduling.cancel(
            request.app[SANDBOX],
            request.app[DISPATCHER],
            tenant,
            request.match_info["id"],
            scheduling.CancelRequest(),
        )
    except scheduling.SchedulingError as exc:
        raise _back(tenant, exc.message) from None
    raise _back(tenant, f"Cancelled Appointment/{request.match_info['id']}.")


def routes() -> list[web.RouteDef]:
    t = "/powerchart/{tenant}"
    return [
        web.get("/powerchart", index),
        web.get(t, tenant_page),
        web.post(f"{t}/launch", launch),
        web.post(f"{t}/book", book),
        web.post(f"{t}/appointments/{{id}}/reschedule", reschedule),
        web.post(f"{t}/appointments/{{id}}/cancel", cancel),
    ]

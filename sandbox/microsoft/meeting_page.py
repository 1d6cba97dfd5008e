"""The browser meeting page (lobby, admit, leave, end) and the same actions as JSON calls."""

from __future__ import annotations

import html
import json
from typing import Any

from aiohttp import web

from sandbox.microsoft.clock import graph_time
from sandbox.microsoft.core import Sandbox
from sandbox.microsoft.meetings import Meeting, MeetingError, MeetingStore

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;max-width:40em;margin:2em auto;padding:0 1em}
button{margin:.2em;padding:.4em .9em}#lobby{background:#f4f4ff;padding:1em;display:none}
li{margin:.3em 0}.muted{color:#777}
</style></head><body>
<h1>__TITLE__</h1>
<p class="muted">Microsoft Teams (local sandbox) &middot; you join as <b>__ROLE__</b></p>
<div id="pre"><label>Your name <input id="name" value="__NAME__"></label>
<button id="join">Join now</button></div>
<div id="lobby"><b>Waiting in the lobby.</b> Someone in the meeting will let you in soon.</div>
<div id="in" hidden><b>You are in the meeting.</b> <button id="leave">Leave</button>
<button id="end" hidden>End meeting for all</button></div>
<h2>People</h2><ul id="roster"></ul>
<script>
const M = __MEETING__, ROLE = __ROLE_JSON__;
let me = null;
async function call(action, body) {
  const r = await fetch(`/_sandbox/meetings/${M}/${action}`, {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body || {})});
  const j = await r.json(); if (!r.ok) alert(j.error && j.error.message); return j;
}
document.getElementById("join").onclick = async () => {
  me = (await call("join", {role: ROLE, display: document.getElementById("name").value}));
  document.getElementById("pre").hidden = true; refresh();
};
const $ = (id) => document.getElementById(id);
$("leave").onclick = async () => {
  await call("leave", {participantId: me.id}); me = null; refresh();
};
document.getElementById("end").onclick = async () => { await call("end"); me = null; refresh(); };
async function refresh() {
  const s = await (await fetch(`/_sandbox/meetings/${M}/state`)).json();
  const ul = document.getElementById("roster"); ul.innerHTML = "";
  const mine = me && s.participants.find(p => p.id === me.id);
  for (const p of s.participants.filter(p => p.state !== "left")) {
    const li = document.createElement("li");
    li.textContent = `${p.displayName} (${p.role}) — ${p.state}`;
    if (p.state === "lobby" && mine && mine.state === "inMeeting" && ROLE !== "attendee") {
      const b = document.createElement("button"); b.textContent = "Admit";
      b.onclick = () => call("admit", {participantId: p.id}).then(refresh); li.appendChild(b);
    }
    ul.appendChild(li);
  }
  $("lobby").style.display = mine && mine.state === "lobby" ? "block" : "none";
  document.getElementById("in").hidden = !(mine && mine.state === "inMeeting");
  document.getElementById("end").hidden = ROLE !== "organizer";
  if (me && (!mine || mine.state === "left")) { me = null; $("pre").hidden = false; }
}
setInterval(refresh, 1000); refresh();
</script></body></html>
"""


class MeetingPages:
    """Meeting page routes plus the JSON sandbox actions that drive a visit."""

    def __init__(self, sb: Sandbox, meetings: MeetingStore) -> None:
        self.sb = sb
        self.meetings = meetings

    def _page(self, meeting: Meeting, role: str) -> web.Response:
        name = meeting.organizer.display_name if role == "organizer" else ""
        text = (
            _PAGE.replace("__TITLE__", html.escape(meeting.subject or "Teams meeting"))
            .replace("__ROLE_JSON__", json.dumps(role))
            .replace("__ROLE__", html.escape(role))
            .replace("__NAME__", html.escape(name))
            .replace("__MEETING__", json.dumps(meeting.id))
        )
        return web.Response(text=text, content_type="text/html")

    async def join_web_url(self, request: web.Request) -> web.Response:
        """``/l/meetup-join/...``: the staff view (organizer)."""
        meeting = self.meetings.by_thread.get(request.match_info["thread"])
        if meeting is None:
            raise web.HTTPNotFound(text="meeting not found")
        role = request.query.get("role", "organizer")
        return self._page(meeting, role if role in ("organizer", "attendee") else "organizer")

    async def virtual_appointment(self, request: web.Request) -> web.Response:
        """``/webrtc-svc/api/route?tid=..&convId=..``: the patient (guest) browser join."""
        meeting = self.meetings.by_thread.get(request.query.get("convId", ""))
        if meeting is None or meeting.organizer.tenant_id != request.query.get("tid"):
            raise web.HTTPNotFound(text="meeting not found")
        return self._page(meeting, "attendee")

    async def page(self, request: web.Request) -> web.Response:
        meeting = self._meeting(request)
        return self._page(meeting, request.query.get("role", "attendee"))

    # -- JSON actions -------------------------------------------------------------------------
    def _meeting(self, request: web.Request) -> Meeting:
        meeting = self.meetings.by_id.get(request.match_info["id"])
        if meeting is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": {"code": "NotFound", "message": "no such meeting"}}),
                content_type="application/json",
            )
        return meeting

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        data = await request.json()
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _error(exc: MeetingError) -> web.Response:
        code = {400: "BadRequest", 403: "Forbidden", 404: "NotFound"}.get(exc.status, "Conflict")
        return web.json_response({"error": {"code": code, "message": str(exc)}}, status=exc.status)

    async def state(self, request: web.Request) -> web.Response:
        meeting = self._meeting(request)
        call = meeting.call
        return web.json_response(
            {
                "id": meeting.id,
                "subject": meeting.subject,
                "joinWebUrl": meeting.join_web_url,
                "virtualAppointmentUrl": self.meetings.virtual_appointment_url(meeting),
                "organizer": meeting.organizer.upn,
                "callActive": call is not None and call.ended_at is None,
                "callId": call.id if call else None,
                "participants": [p.public() for p in call.participants] if call else [],
                "attendanceReportIds": [r["id"] for r in meeting.reports],
                "now": graph_time(self.sb.clock.now()),
            }
        )

    async def join(self, request: web.Request) -> web.Response:
        meeting = self._meeting(request)
        body = await self._body(request)
        user = None
        if body.get("userId"):
            user = self.sb.directory.user(str(body["userId"]))
            if user is None:
                return self._error(MeetingError(404, f"unknown user {body['userId']}"))
        try:
            p = self.meetings.join(
                meeting, str(body.get("role", "attendee")), str(body.get("display", "")), user
            )
        except MeetingError as exc:
            return self._error(exc)
        return web.json_response(p.public())

    async def admit(self, request: web.Request) -> web.Response:
        meeting = self._meeting(request)
        body = await self._body(request)
        leg = body.get("participantId")
        try:
            admitted = self.meetings.admit(meeting, str(leg) if leg else None)
        except MeetingError as exc:
            return self._error(exc)
        return web.json_response({"admitted": [p.public() for p in admitted]})

    async def leave(self, request: web.Request) -> web.Response:
        meeting = self._meeting(request)
        body = await self._body(request)
        try:
            p = self.meetings.leave(meeting, str(body.get("participantId", "")))
        except MeetingError as exc:
            return self._error(exc)
        return web.json_response(p.public())

    async def end(self, request: web.Request) -> web.Response:
        meeting = self._meeting(request)
        try:
            report = self.meetings.end(meeting)
        except MeetingError as exc:
            return self._error(exc)
        return web.json_response({"attendanceReport": report})

    async def list_meetings(self, request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "id": m.id,
                    "externalId": m.external_id,
                    "organizer": m.organizer.upn,
                    "subject": m.subject,
                    "joinWebUrl": m.join_web_url,
                    "startDateTime": graph_time(m.start),
                    "endDateTime": graph_time(m.end),
                    "updateCount": m.update_count,
                }
                for m in self.meetings.by_id.values()
            ]
        )

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/l/meetup-join/{thread}/{n}", self.join_web_url)
        router.add_get("/webrtc-svc/api/route", self.virtual_appointment)
        router.add_get("/_sandbox/meetings", self.list_meetings)
        router.add_get("/_sandbox/meetings/{id}", self.page)
        router.add_get("/_sandbox/meetings/{id}/state", self.state)
        router.add_post("/_sandbox/meetings/{id}/join", self.join)
        router.add_post("/_sandbox/meetings/{id}/admit", self.admit)
        router.add_post("/_sandbox/meetings/{id}/leave", self.leave)
        router.add_post("/_sandbox/meetings/{id}/end", self.end)

"""Contract tests: Graph stand-in (auth refusals, createOrGet, subscriptions, a full visit)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.clock import ManualClock, graph_time
from sandbox.microsoft.directory import (
    CONNECTOR_CLIENT_ID,
    CONNECTOR_CLIENT_SECRET,
    CONTOSO_TENANT,
    FABRIKAM_TENANT,
)
from tests.sandbox.ms_helpers import Receiver

DOCTOR = "dr.lee@contosohealth.onmicrosoft.com"


async def app_token(ms: RunningSandbox, http: aiohttp.ClientSession, tenant: str) -> str:
    form = {
        "grant_type": "client_credentials",
        "client_id": CONNECTOR_CLIENT_ID,
        "client_secret": CONNECTOR_CLIENT_SECRET,
        "scope": "https://graph.microsoft.com/.default",
    }
    async with http.post(f"{ms.base_url}/{tenant}/oauth2/v2.0/token", data=form) as resp:
        assert resp.status == 200
        return str((await resp.json())["access_token"])


class GraphClient:
    def __init__(self, ms: RunningSandbox, http: aiohttp.ClientSession, token: str) -> None:
        self.ms, self.http, self.token = ms, http, token

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        url = f"{self.ms.base_url}/v1.0{path}"
        async with self.http.request(method, url, json=body, headers=headers) as resp:
            data = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, data

    async def meeting(self, external_id: str = "appt-1") -> dict[str, Any]:
        status, data = await self.call(
            "POST",
            f"/users/{DOCTOR}/onlineMeetings/createOrGet",
            {
                "externalId": external_id,
                "startDateTime": "2030-01-07T14:00:00Z",
                "endDateTime": "2030-01-07T14:30:00Z",
                "subject": "Video visit",
                "participants": {"attendees": []},
                "lobbyBypassSettings": {"scope": "organizer", "isDialInBypassEnabled": False},
            },
        )
        assert status in (200, 201)
        return dict(data)

    async def subscribe(
        self, meeting: dict[str, Any], url: str, clock: ManualClock
    ) -> tuple[int, Any]:
        resource = (
            "/communications/onlineMeetings(joinWebUrl='"
            + quote(meeting["joinWebUrl"], safe="")
            + "')/meetingCallEvents"
        )
        return await self.call(
            "POST",
            "/subscriptions",
            {
                "changeType": "created,updated",
                "notificationUrl": url,
                "resource": resource,
                "expirationDateTime": graph_time(clock.now() + timedelta(hours=2)),
                "clientState": "secret-client-state",
            },
        )


@pytest.fixture
async def graph(ms: RunningSandbox, ms_http: aiohttp.ClientSession) -> GraphClient:
    """A Graph client with a Contoso app-only token."""
    return GraphClient(ms, ms_http, await app_token(ms, ms_http, CONTOSO_TENANT))


async def test_missing_token_is_401(graph: GraphClient) -> None:
    """No bearer token: 401 with Graph's error envelope."""
    graph.token = ""
    status, body = await graph.call("POST", f"/users/{DOCTOR}/onlineMeetings/createOrGet", {})
    assert status == 401
    assert body["error"]["code"] == "InvalidAuthenticationToken"
    assert body["error"]["message"]


async def test_invalid_token_is_401(graph: GraphClient) -> None:
    """A tampered token fails signature validation: 401."""
    graph.token = graph.token[:-4] + ("AAAA" if not graph.token.endswith("AAAA") else "BBBB")
    status, body = await graph.call("GET", "/subscriptions")
    assert status == 401
    assert body["error"]["code"] == "InvalidAuthenticationToken"


async def test_expired_token_is_401(graph: GraphClient, ms_clock: ManualClock) -> None:
    """After its exp the app token is refused."""
    ms_clock.advance(3600)
    status, body = await graph.call("GET", "/subscriptions")
    assert status == 401
    assert "expired" in body["error"]["message"]


async def test_organizer_in_other_tenant_is_not_found(
    ms: RunningSandbox, graph: GraphClient, ms_http: aiohttp.ClientSession
) -> None:
    """An organizer in another tenant than the token's is not found (wrong tenant)."""
    fabrikam = GraphClient(ms, ms_http, await app_token(ms, ms_http, FABRIKAM_TENANT))
    status, body = await fabrikam.call(
        "POST", f"/users/{DOCTOR}/onlineMeetings/createOrGet", {"externalId": "x"}
    )
    assert status == 404
    assert body["error"]["code"] == "NotFound"


async def test_create_or_get_is_idempotent(graph: GraphClient) -> None:
    """createOrGet answers 201 first, then 200 with the same meeting for the same externalId."""
    body = {"externalId": "appt-42", "subject": "Visit"}
    path = f"/users/{DOCTOR}/onlineMeetings/createOrGet"
    s1, m1 = await graph.call("POST", path, body)
    s2, m2 = await graph.call("POST", path, body)
    assert (s1, s2) == (201, 200)
    assert m1["id"] == m2["id"]
    assert m1["joinWebUrl"].startswith(graph.ms.base_url)
    assert m1["chatInfo"]["threadId"].startswith("19:meeting_")
    for field in ("externalId", "startDateTime", "endDateTime", "subject", "lobbyBypassSettings"):
        assert field in m1


async def test_virtual_appointment_url_opens_guest_page(
    graph: GraphClient, ms_http: aiohttp.ClientSession
) -> None:
    """getVirtualAppointmentJoinWebUrl returns a browser-join URL served by the stand-in."""
    meeting = await graph.meeting()
    status, data = await graph.call(
        "GET", f"/users/{DOCTOR}/onlineMeetings/{meeting['id']}/getVirtualAppointmentJoinWebUrl"
    )
    assert status == 200
    async with ms_http.get(data["value"]) as resp:
        assert resp.status == 200
        assert "lobby" in await resp.text()


async def test_subscription_to_http_url_is_refused(
    graph: GraphClient, ms_clock: ManualClock
) -> None:
    """Graph notifies only https notificationUrls."""
    meeting = await graph.meeting()
    status, body = await graph.subscribe(meeting, "http://127.0.0.1:9/hook", ms_clock)
    assert status == 400
    assert body["error"]["code"] == "ValidationError"


async def test_failed_validation_handshake_is_refused(
    graph: GraphClient, ms_receiver: Receiver, ms_clock: ManualClock
) -> None:
    """A receiver that does not echo validationToken gets no subscription."""
    ms_receiver.echo_validation = False
    meeting = await graph.meeting()
    status, body = await graph.subscribe(meeting, ms_receiver.url, ms_clock)
    assert status == 400
    assert "validation" in body["error"]["message"].lower()
    assert ms_receiver.validations


async def test_subscription_longer_than_three_days_is_refused(
    graph: GraphClient, ms_receiver: Receiver, ms_clock: ManualClock
) -> None:
    """expirationDateTime may be at most 3 days ahead; PATCH renews, DELETE removes."""
    meeting = await graph.meeting()
    status, sub = await graph.subscribe(meeting, ms_receiver.url, ms_clock)
    assert status == 201
    too_far = graph_time(ms_clock.now() + timedelta(days=3, minutes=1))
    status, _ = await graph.call(
        "PATCH", f"/subscriptions/{sub['id']}", {"expirationDateTime": too_far}
    )
    assert status == 400
    ok = graph_time(ms_clock.now() + timedelta(days=3))
    status, renewed = await graph.call(
        "PATCH", f"/subscriptions/{sub['id']}", {"expirationDateTime": ok}
    )
    assert status == 200
    assert renewed["expirationDateTime"] == ok
    assert (await graph.call("DELETE", f"/subscriptions/{sub['id']}"))[0] == 204
    assert (await graph.call("GET", f"/subscriptions/{sub['id']}"))[0] == 404


async def _act(http: aiohttp.ClientSession, ms: RunningSandbox, mid: str, action: str,
               body: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    async with http.post(f"{ms.base_url}/_sandbox/meetings/{mid}/{action}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def test_full_visit_notifies_roster_and_builds_attendance(
    ms: RunningSandbox,
    graph: GraphClient,
    ms_http: aiohttp.ClientSession,
    ms_receiver: Receiver,
    ms_clock: ManualClock,
) -> None:
    """Lobby, admit, leave, end: CallStarted/CallRosterUpdate/CallEnded, then attendance."""
    meeting = await graph.meeting("appt-visit")
    status, sub = await graph.subscribe(meeting, ms_receiver.url, ms_clock)
    assert status == 201
    mid = meeting["id"]
    ms_receiver.fail_next = 1  # the first delivery fails and is retried
    patient = await _act(ms_http, ms, mid, "join", {"role": "attendee", "display": "Pat"})
    assert patient["state"] == "lobby"
    ms_clock.advance(60)
    doctor = await _act(ms_http, ms, mid, "join", {"role": "organizer"})
    assert doctor["state"] == "inMeeting"
    ms_clock.advance(30)
    await _act(ms_http, ms, mid, "admit", {"participantId": patient["id"]})
    ms_clock.advance(600)
    await _act(ms_http, ms, mid, "leave", {"participantId": patient["id"]})
    ms_clock.advance(10)
    await _act(ms_http, ms, mid, "end")

    def ended(_: list[Any]) -> bool:
        return any(
            n["resourceData"]["eventType"].endswith("CallEnded")
            for n in ms_receiver.graph_notifications()
        )

    await ms_receiver.wait_for(ended)
    notes = ms_receiver.graph_notifications()
    assert ms_receiver.failed == 1
    assert {n["clientState"] for n in notes} == {"secret-client-state"}
    assert {n["subscriptionId"] for n in notes} == {sub["id"]}
    assert {n["tenantId"] for n in notes} == {CONTOSO_TENANT}
    kinds = [n["resourceData"]["eventType"].rsplit(".", 1)[1] for n in notes]
    assert kinds[0] == "CallStarted"
    assert kinds[-1] == "CallEnded"
    rosters = [
        n["resourceData"] for n in notes if n["resourceData"]["eventType"].endswith("Update")
    ]
    lobby = rosters[0]["activeParticipants@joined"][0]
    assert lobby["IsInLobby"] is True
    assert "Guest" in lobby["Identity"]
    assert rosters[1]["activeParticipants@joined"][0]["Identity"]["User"]["TenantId"]
    admitted = rosters[2]["activeParticipants@joined"][0]
    assert admitted["Id"] == patient["id"]
    assert admitted["IsInLobby"] is False
    assert rosters[3]["activeParticipants@exited"][0]["Id"] == patient["id"]

    base = f"/users/{DOCTOR}/onlineMeetings/{mid}/attendanceReports"
    status, reports = await graph.call("GET", base)
    assert status == 200
    report = reports["value"][0]
    assert report["totalParticipantCount"] == 2
    assert report["meetingStartDateTime"] < report["meetingEndDateTime"]
    status, full = await graph.call("GET", f"{base}/{report['id']}?$expand=attendanceRecords")
    assert status == 200
    records = {r["role"]: r for r in full["attendanceRecords"]}
    assert records["Attendee"]["totalAttendanceInSeconds"] == 600
    assert records["Organizer"]["totalAttendanceInSeconds"] == 640
    assert records["Organizer"]["emailAddress"] == DOCTOR
    interval = records["Attendee"]["attendanceIntervals"][0]
    assert interval["durationInSeconds"] == 600
    status, recs = await graph.call("GET", f"{base}/{report['id']}/attendanceRecords")
    assert status == 200
    assert len(recs["value"]) == 2

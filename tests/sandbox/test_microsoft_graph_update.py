"""Contract tests: the Graph stand-in's PATCH /users/{user}/onlineMeetings/{id} (Update
onlineMeeting, v1.0): what it changes, what it answers, and what it refuses."""

from __future__ import annotations

from typing import Any

import aiohttp
import jwt
import pytest

from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.clock import ManualClock
from sandbox.microsoft.directory import (
    CONNECTOR_CLIENT_SECRET,
    CONTOSO_TENANT,
    FABRIKAM_TENANT,
)
from tests.sandbox.test_microsoft_graph import DOCTOR, GraphClient, app_token

START = "2030-01-07T15:00:00Z"
END = "2030-01-07T15:45:00Z"


@pytest.fixture
async def graph(ms: RunningSandbox, ms_http: aiohttp.ClientSession) -> GraphClient:
    """A Graph client with a Contoso app-only token."""
    return GraphClient(ms, ms_http, await app_token(ms, ms_http, CONTOSO_TENANT))


def _path(meeting: dict[str, Any]) -> str:
    return f"/users/{DOCTOR}/onlineMeetings/{meeting['id']}"


async def _refused(graph: GraphClient, path: str, body: Any, status: int, code: str) -> str:
    answer, error = await graph.call("PATCH", path, body)
    assert answer == status, error
    assert error["error"]["code"] == code
    return str(error["error"]["message"])


async def test_patch_moves_the_meeting_and_answers_200_with_it(graph: GraphClient) -> None:
    """Start and end together move the meeting: 200 with the whole updated meeting, and a
    later GET shows the new times; the same PATCH again answers the same."""
    meeting = await graph.meeting()
    body = {"startDateTime": START, "endDateTime": END}
    status, moved = await graph.call("PATCH", _path(meeting), body)
    assert status == 200, moved
    assert moved["id"] == meeting["id"]
    assert moved["joinWebUrl"] == meeting["joinWebUrl"]
    assert moved["externalId"] == meeting["externalId"]
    assert moved["startDateTime"].startswith("2030-01-07T15:00:00")
    assert moved["endDateTime"].startswith("2030-01-07T15:45:00")
    assert moved["@odata.context"].endswith("#onlineMeetings/$entity")
    status, fetched = await graph.call("GET", _path(meeting))
    assert status == 200
    assert (fetched["startDateTime"], fetched["endDateTime"]) == (
        moved["startDateTime"],
        moved["endDateTime"],
    )
    status, again = await graph.call("PATCH", _path(meeting), body)
    assert status == 200
    assert (again["startDateTime"], again["endDateTime"]) == (
        moved["startDateTime"],
        moved["endDateTime"],
    )


async def test_patch_changes_only_what_it_names(graph: GraphClient) -> None:
    """A subject or a lobby setting alone leaves the times as they were; a partial
    lobbyBypassSettings keeps the scope it does not name."""
    meeting = await graph.meeting()
    status, changed = await graph.call(
        "PATCH",
        _path(meeting),
        {"subject": "Moved visit", "lobbyBypassSettings": {"isDialInBypassEnabled": True}},
    )
    assert status == 200, changed
    assert changed["subject"] == "Moved visit"
    assert changed["lobbyBypassSettings"] == {"scope": "organizer", "isDialInBypassEnabled": True}
    assert changed["startDateTime"] == meeting["startDateTime"]
    assert changed["endDateTime"] == meeting["endDateTime"]


async def test_end_before_start_is_400(graph: GraphClient) -> None:
    """An end earlier than the start is refused with 400 and the meeting keeps its times."""
    meeting = await graph.meeting()
    body = {"startDateTime": END, "endDateTime": START}
    message = await _refused(graph, _path(meeting), body, 400, "BadRequest")
    assert "endDateTime" in message
    _, fetched = await graph.call("GET", _path(meeting))
    assert fetched["startDateTime"] == meeting["startDateTime"]


async def test_one_time_without_the_other_is_400(graph: GraphClient) -> None:
    """Graph changes a meeting's time only with both startDateTime and endDateTime."""
    meeting = await graph.meeting()
    await _refused(graph, _path(meeting), {"startDateTime": START}, 400, "BadRequest")
    await _refused(graph, _path(meeting), {"endDateTime": END}, 400, "BadRequest")
    body = {"startDateTime": "next tuesday", "endDateTime": END}
    await _refused(graph, _path(meeting), body, 400, "BadRequest")


async def test_read_only_and_unknown_properties_are_400(graph: GraphClient) -> None:
    """Properties Graph does not update (joinWebUrl, externalId, the organizer) answer 400
    InvalidArgument; a property onlineMeeting does not have answers 400 BadRequest; a value
    of the wrong type or outside an enumeration is 400 too. Nothing changes."""
    meeting = await graph.meeting()
    path = _path(meeting)
    for body in (
        {"joinWebUrl": "https://example.com/join"},
        {"externalId": "another"},
        {"id": "x", "startDateTime": START, "endDateTime": END},
        {"participants": {"organizer": {"upn": "someone@contosohealth.onmicrosoft.com"}}},
    ):
        message = await _refused(graph, path, body, 400, "InvalidArgument")
        assert "do not support updating" in message
    message = await _refused(graph, path, {"colour": "blue"}, 400, "BadRequest")
    assert "'colour' does not exist" in message
    await _refused(graph, path, {"subject": 7}, 400, "BadRequest")
    await _refused(graph, path, {"allowMeetingChat": "sometimes"}, 400, "BadRequest")
    await _refused(graph, path, ["startDateTime"], 400, "BadRequest")
    _, fetched = await graph.call("GET", path)
    assert fetched["startDateTime"] == meeting["startDateTime"]
    assert fetched["externalId"] == meeting["externalId"]


async def test_malformed_json_is_400(graph: GraphClient) -> None:
    """A body that is not JSON is refused with 400 BadRequest."""
    meeting = await graph.meeting()
    headers = {"Authorization": f"Bearer {graph.token}", "Content-Type": "application/json"}
    url = f"{graph.ms.base_url}/v1.0{_path(meeting)}"
    async with graph.http.patch(url, data=b'{"startDateTime": ', headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "BadRequest"


async def test_unknown_meeting_or_organizer_is_404(
    ms: RunningSandbox, graph: GraphClient, ms_http: aiohttp.ClientSession
) -> None:
    """A meeting id Graph does not know, or a meeting under another organizer or seen from
    another tenant's token, is 404."""
    body = {"startDateTime": START, "endDateTime": END}
    meeting = await graph.meeting()
    await _refused(graph, f"/users/{DOCTOR}/onlineMeetings/bm9uZQ", body, 404, "NotFound")
    other = "user@contosohealth.onmicrosoft.com"
    await _refused(graph, f"/users/{other}/onlineMeetings/{meeting['id']}", body, 404, "NotFound")
    fabrikam = GraphClient(ms, ms_http, await app_token(ms, ms_http, FABRIKAM_TENANT))
    await _refused(fabrikam, _path(meeting), body, 404, "NotFound")


async def test_missing_expired_or_foreign_tokens_are_401(
    ms: RunningSandbox, graph: GraphClient, ms_clock: ManualClock
) -> None:
    """No token, a token for another audience, a tampered one and an expired one are 401
    InvalidAuthenticationToken, as on Graph's other routes."""
    meeting = await graph.meeting()
    body = {"startDateTime": START, "endDateTime": END}
    good = graph.token
    claims = jwt.decode(good, options={"verify_signature": False})
    for token in (
        "",
        ms.components.sandbox.keys.sign({**claims, "aud": "api://another-resource"}),
        good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
    ):
        graph.token = token
        await _refused(graph, _path(meeting), body, 401, "InvalidAuthenticationToken")
    graph.token = good
    ms_clock.advance(3600)
    message = await _refused(graph, _path(meeting), body, 401, "InvalidAuthenticationToken")
    assert "expired" in message


async def test_a_token_without_the_write_role_is_403(
    ms: RunningSandbox, graph: GraphClient, ms_http: aiohttp.ClientSession
) -> None:
    """An app granted only OnlineMeetings.Read.All may read the meeting but not move it
    (403); a delegated (user) token is refused too."""
    meeting = await graph.meeting()
    reader = {
        "clientId": "0b7c7b5e-1c1f-4c55-9d8e-4f6a7b8c9d0e",
        "displayName": "read-only reader",
        "clientSecret": CONNECTOR_CLIENT_SECRET,
        "roles": ["OnlineMeetings.Read.All"],
    }
    async with ms_http.post(f"{ms.base_url}/_sandbox/entra/apps", json=reader) as r:
        assert r.status in (200, 201), await r.text()
    form = {
        "grant_type": "client_credentials",
        "client_id": reader["clientId"],
        "client_secret": CONNECTOR_CLIENT_SECRET,
        "scope": "https://graph.microsoft.com/.default",
    }
    async with ms_http.post(f"{ms.base_url}/{CONTOSO_TENANT}/oauth2/v2.0/token", data=form) as r:
        assert r.status == 200, await r.text()
        token = str((await r.json())["access_token"])
    read_only = GraphClient(ms, ms_http, token)
    status, _ = await read_only.call("GET", _path(meeting))
    assert status == 200
    body = {"startDateTime": START, "endDateTime": END}
    message = await _refused(read_only, _path(meeting), body, 403, "Forbidden")
    assert "OnlineMeetings.ReadWrite.All" in message
    claims = jwt.decode(graph.token, options={"verify_signature": False})
    delegated = GraphClient(
        ms, ms_http, ms.components.sandbox.keys.sign({**claims, "idtyp": "user"})
    )
    await _refused(delegated, _path(meeting), body, 403, "Forbidden")


async def test_the_meeting_list_shows_times_and_updates(
    graph: GraphClient, ms_http: aiohttp.ClientSession
) -> None:
    """GET /_sandbox/meetings shows each meeting's times and how many PATCHes it took."""
    meeting = await graph.meeting()
    await graph.call("PATCH", _path(meeting), {"startDateTime": START, "endDateTime": END})
    async with ms_http.get(f"{graph.ms.base_url}/_sandbox/meetings") as r:
        (listed,) = await r.json()
    assert listed["startDateTime"].startswith("2030-01-07T15:00:00")
    assert listed["endDateTime"].startswith("2030-01-07T15:45:00")
    assert listed["updateCount"] == 1

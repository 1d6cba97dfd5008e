"""What a provider launch sends to Postgres, request by request, and that the callback's
one statement recording the clinician and starting the session (sessions.py) writes
nothing for a sign-in that is refused or a visit without its meeting; a launch that makes
the meeting records the visit and starts the session in one statement (meetings.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import asyncpg
import pytest
import structlog
from aiokafka import AIOKafkaProducer

from libs.common.keys import appointment_key
from libs.common.web import DB_POOL
from sandbox.ehr import TENANT_A
from services.launch.integrations import Integration
from services.launch.meeting_preparation import prepare_meeting
from services.launch.meetings import Meeting, Visit, record_visit
from services.launch.sessions import NewSession, new_session
from services.launch.state import CIPHER
from tests.launch.test_launch_refusals import _callback_url
from tests.launch.test_meeting_preparation import UNKNOWN_ORGANIZER, _set_organizer
from tests.launch.test_visit_end_to_end import book_video_visit, launch_from_ehr
from tests.support.launch_harness import LaunchSystem, follow

LAUNCH = "/launch/provider/{integration_id}"
CALLBACK = "/launch/callback"
VISIT = "/visit"


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Statements the gateway sends to Postgres while serving a request, by route (the
    route structlog binds for the request); background work is not counted, nor the
    integration directory's cache refresh (once in a few seconds, in whichever request)."""
    counts: Counter[str] = Counter()

    def count(query: str) -> None:
        route = structlog.contextvars.get_contextvars().get("route")
        if route is not None and "FROM integrations" not in query:
            counts[route] += 1

    connection: Any = asyncpg.Connection
    execute, bind_execute = connection.execute, connection._execute

    async def counted_execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if not args:  # with arguments it goes through _execute, counted there
            count(query)
        return await execute(self, query, *args, **kwargs)

    async def counted_bind_execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        count(query)
        return await bind_execute(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "execute", counted_execute)
    monkeypatch.setattr(asyncpg.Connection, "_execute", counted_bind_execute)
    return counts


async def _prepared_visit(http: aiohttp.ClientSession, system: LaunchSystem) -> tuple[str, str]:
    """A visit booked through the feed with its meeting prepared: (FHIR id, appointment key)."""
    appointment = await book_video_visit(http, system, timedelta(minutes=30))
    pool = system.app[DB_POOL]
    for _ in range(100):
        key = await pool.fetchval("SELECT appointment_key FROM appointments")
        if key is not None:
            break
        await asyncio.sleep(0.05)
    assert key is not None
    assert await prepare_meeting(system.app, key) in ("ready", "prepared")
    return str(appointment["id"]), str(key)


async def _visit_row(system: LaunchSystem, key: str) -> dict[str, Any]:
    row = await system.app[DB_POOL].fetchrow(
        "SELECT ehr_user_id, updated_at, meeting_id FROM appointments WHERE appointment_key = $1",
        key,
    )
    assert row is not None
    return dict(row)


async def _sessions(system: LaunchSystem) -> list[dict[str, Any]]:
    rows = await system.app[DB_POOL].fetch(
        "SELECT token_hash, ehr_user_id, appointment_key, candidates FROM provider_sessions"
        " ORDER BY token_hash"
    )
    return [dict(row) for row in rows]


async def test_prepared_launch_statements_per_request(
    launch_system: LaunchSystem, statements: Counter[str]
) -> None:
    """With the meeting prepared: one statement to store the state, two in the callback
    (consume the state; record the clinician and start the session), one for the page."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment, key = await _prepared_visit(http, system)
        statements.clear()
        status, page, cookies = await launch_from_ehr(http, system, appointment)
    assert status == 200, page
    assert "Join the meeting" in page
    assert statements == {LAUNCH: 1, CALLBACK: 2, VISIT: 1}
    assert "provider_session" in cookies
    visit = await _visit_row(system, key)
    assert str(visit["ehr_user_id"]).startswith("Practitioner/")
    (session,) = await _sessions(system)
    assert session["appointment_key"] == key
    assert session["ehr_user_id"] == visit["ehr_user_id"]
    assert session["candidates"] is None


def _with(callback: str, **params: str) -> str:
    parts = urlsplit(callback)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()} | params
    return parts._replace(query=urlencode(query)).geturl()


async def test_reused_state_or_code_is_refused_and_writes_nothing(
    launch_system: LaunchSystem, statements: Counter[str]
) -> None:
    """After a launch of a prepared visit, its callback again, its state with a fresh code
    and its code with a fresh state are all refused: each callback sends only the statement
    that consumes a state, and no session or visit row changes."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment, key = await _prepared_visit(http, system)
        used = await _callback_url(http, system, appointment)
        response, page, _ = await follow(http, used)
        assert response.status == 200, page
        before = (await _visit_row(system, key), await _sessions(system))
        assert len(before[1]) == 1

        fresh = parse_qs(urlsplit(await _callback_url(http, system, appointment)).query)
        attempts = {
            "replayed": used,
            "used state, fresh code": _with(used, code=fresh["code"][0]),
            "fresh state, used code": _with(used, state=fresh["state"][0]),
        }
        for attempt, url in attempts.items():
            statements.clear()
            async with http.get(url, allow_redirects=False) as r:
                assert r.status == 400, attempt
                assert "provider_session" not in r.cookies, attempt
            assert statements == {CALLBACK: 1}, attempt
    assert (await _visit_row(system, key), await _sessions(system)) == before


async def test_a_launch_whose_meeting_cannot_be_prepared_starts_no_session(
    launch_system: LaunchSystem, producer: AIOKafkaProducer, topic_prefix: str
) -> None:
    """A visit still without its meeting gets none from the statement that records the
    clinician; when Graph then refuses the meeting the clinician gets 503 and no session."""
    system = launch_system
    await _set_organizer(system, producer, topic_prefix, UNKNOWN_ORGANIZER, version=2)
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system, timedelta(days=20))
        status, page, cookies = await launch_from_ehr(http, system, appointment["id"])
    assert status == 503, page
    assert "provider_session" not in cookies
    assert await _sessions(system) == []
    key = await system.app[DB_POOL].fetchval("SELECT appointment_key FROM appointments")
    assert (await _visit_row(system, key))["meeting_id"] is None


async def test_a_launch_making_its_meeting_records_the_visit_and_session_in_one_statement(
    launch_system: LaunchSystem, statements: Counter[str]
) -> None:
    """A visit the feed never sent: the callback consumes the state, finds no visit in the
    statement that records the clinician, makes the meeting, then records the visit, its
    `appointment-created` and the clinician's session in one statement (three, was four)."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        async with http.patch(
            f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}", json={"webhook_url": None}
        ) as r:
            assert r.status == 200, await r.text()
        appointment = await book_video_visit(http, system, timedelta(minutes=30))
        statements.clear()
        status, page, cookies = await launch_from_ehr(http, system, appointment["id"])
    assert status == 200, page
    assert "Join the meeting" in page
    assert statements == {LAUNCH: 1, CALLBACK: 3, VISIT: 1}
    assert "provider_session" in cookies
    pool = system.app[DB_POOL]
    key = await pool.fetchval("SELECT appointment_key FROM appointments")
    visit = await _visit_row(system, key)
    assert visit["meeting_id"] is not None
    assert str(visit["ehr_user_id"]).startswith("Practitioner/")
    (session,) = await _sessions(system)
    assert session["appointment_key"] == key
    assert session["ehr_user_id"] == visit["ehr_user_id"]
    events = "SELECT count(*) FROM outbox WHERE topic = 'appointment-created' AND key = $1"
    assert await pool.fetchval(events, key) == 1


async def test_recording_a_visit_known_meanwhile_still_starts_the_session(
    launch_system: LaunchSystem,
) -> None:
    """The statement that records a visit with a session: a new visit gets its row, its one
    event and the session; a visit recorded meanwhile (a launch racing the feed's booking or
    another launch) keeps its row and event, and the session is started all the same."""
    system = launch_system
    pool = system.app[DB_POOL]
    row = await pool.fetchrow(
        "SELECT * FROM integrations WHERE integration_id = $1", system.integration_id
    )
    assert row is not None
    integration = Integration(**{k: row[k] for k in Integration.__dataclass_fields__})
    secret = system.settings.appointment_key_secret.get_secret_value()
    key = appointment_key(secret, system.integration_id, f"race-{uuid.uuid4().hex}")
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    visit = Visit(
        appointment_key=key, integration=integration, department="General Medicine",
        starts_at=start, ends_at=start + timedelta(minutes=30), time_zone="America/Chicago",
    )  # fmt: skip
    meeting = Meeting(
        meeting_id=f"m-{key}", organizer_id="o", join_web_url=f"https://t.example/{key}",
        patient_join_url=f"https://t.example/p/{key}", subscription_id=f"s-{key}",
        subscription_expires_at=start + timedelta(days=1), client_state_hash=b"x",
    )  # fmt: skip

    def session_of(user: str) -> NewSession:
        return new_session(
            system.app[CIPHER],
            integration_id=system.integration_id,
            ehr_user_id=user,
            candidates=[],
            smart_tokens={"access_token": "a", "refresh_token": None},
            ttl_s=3600,
        )

    first, second = session_of("Practitioner/1"), session_of("Practitioner/2")
    settings = system.settings
    assert await record_visit(
        pool, settings, visit, meeting, ehr_user_id="Practitioner/1", session=first
    )
    assert not await record_visit(
        pool, settings, visit, meeting, ehr_user_id="Practitioner/2", session=second
    )
    with pytest.raises(ValueError, match="clinician"):
        await record_visit(
            pool, settings, visit, meeting, ehr_user_id="Practitioner/3", session=first
        )
    sessions = await _sessions(system)
    assert sorted(s["ehr_user_id"] for s in sessions) == ["Practitioner/1", "Practitioner/2"]
    assert {s["appointment_key"] for s in sessions} == {key}
    assert (await _visit_row(system, key))["ehr_user_id"] == "Practitioner/1"
    events = "SELECT count(*) FROM outbox WHERE topic = 'appointment-created' AND key = $1"
    assert await pool.fetchval(events, key) == 1

"""What a provider launch sends to Postgres, request by request, and that the callback's
one statement recording the clinician and starting the session (sessions.py) writes
nothing for a sign-in that is refused or a visit without its meeting."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import asyncpg
import pytest
import structlog
from aiokafka import AIOKafkaProducer

from libs.common.web import DB_POOL
from services.launch.meeting_preparation import prepare_meeting
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

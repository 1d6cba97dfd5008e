"""Concurrent opens of join links share their Postgres round trips (lobby_batches.py): each
request still gets its own page, and each (visit, device) exactly one lobby arrival and one
`patient-joined`, also when a batch is refused or its connection is lost."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import pytest

from libs.common.events import PatientJoinedV1, decode_event
from libs.common.keys import appointment_key
from libs.common.web import DB_POOL
from services.launch import join_tokens
from services.launch.integrations import Integration
from services.launch.lobby_batches import LOBBY, Arrival, Batcher
from services.launch.meetings import Meeting, Visit, join_link, record_visit
from tests.support.launch_harness import LaunchSystem

if TYPE_CHECKING:
    from libs.common.db import Connection

T = TypeVar("T")
R = TypeVar("R")
ZONE = "America/New_York"
PREJOIN = "Join the visit"


def hold_first(monkeypatch: pytest.MonkeyPatch, batcher: Batcher[T, R], callers: int) -> list[int]:
    """Holds the first statement of `batcher` until `callers` requests have asked it, so the
    other callers - 1 go together in the next batch; returns the batch sizes, as sent."""
    sizes: list[int] = []
    asked, count = asyncio.Event(), 0
    load, statement = batcher.load, batcher.statement

    async def counted(item: T) -> R:
        nonlocal count
        count += 1
        if count == callers:
            asked.set()
        return await load(item)

    async def held(conn: Connection, items: Sequence[T]) -> Sequence[R]:
        if not sizes:
            async with asyncio.timeout(20):
                await asked.wait()
        sizes.append(len(items))
        return await statement(conn, items)

    monkeypatch.setattr(batcher, "load", counted)
    monkeypatch.setattr(batcher, "statement", held)
    return sizes


async def _integration(system: LaunchSystem) -> Integration:
    row = await system.app[DB_POOL].fetchrow(
        "SELECT * FROM integrations WHERE integration_id = $1", system.integration_id
    )
    assert row is not None
    return Integration(**{k: row[k] for k in Integration.__dataclass_fields__})


async def _visits(system: LaunchSystem, starts: Sequence[datetime]) -> list[tuple[str, str]]:
    """30-minute visits recorded as the scheduling feed does, with their meetings: for each,
    (appointment key, join token)."""
    integration = await _integration(system)
    secret = system.settings.join_token_secret.get_secret_value()
    booked = []
    for start in starts:
        key = appointment_key(secret, system.integration_id, f"batch-{uuid.uuid4().hex}")
        visit = Visit(
            appointment_key=key, integration=integration, department="General Medicine",
            starts_at=start, ends_at=start + timedelta(minutes=30), time_zone=ZONE,
        )  # fmt: skip
        meeting = Meeting(
            meeting_id=f"m-{key}", organizer_id="o", join_web_url=f"https://t.example/{key}",
            patient_join_url=f"https://t.example/p/{key}", subscription_id=f"s-{key}",
            subscription_expires_at=datetime.now(UTC) + timedelta(days=1),
            client_state_hash=b"x",
        )  # fmt: skip
        assert await record_visit(system.app[DB_POOL], system.settings, visit, meeting)
        booked.append((key, join_link(system.settings, visit).rsplit("/", 1)[1]))
    return booked


def _device(n: int) -> str:
    return f"device-{n:04d}-{'d' * 20}"


async def _open(
    http: aiohttp.ClientSession, system: LaunchSystem, token: str, device: str
) -> tuple[int, str]:
    headers = {"Cookie": f"visit_device={device}", "Accept": "text/html"}
    async with http.get(f"{system.url}/join/{token}", headers=headers) as r:
        return r.status, await r.text()


async def _lobby(system: LaunchSystem) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
    """Arrival rows and patient-joined outbox rows, by (appointment key, participant)."""
    pool = system.app[DB_POOL]
    arrivals = Counter(
        (r["appointment_key"], r["participant"])
        for r in await pool.fetch("SELECT appointment_key, participant FROM lobby_arrivals")
    )
    joined: Counter[tuple[str, str]] = Counter()
    for row in await pool.fetch("SELECT key, payload FROM outbox WHERE topic = 'patient-joined'"):
        payload = decode_event(bytes(row["payload"])).payload
        assert isinstance(payload, PatientJoinedV1)
        joined[(row["key"], payload.participant)] += 1
    return arrivals, joined


def _session() -> aiohttp.ClientSession:
    # No connection limit: every open is in flight at once.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    )


async def test_concurrent_opens_of_many_visits_each_get_their_own_page_and_one_arrival(
    launch_system: LaunchSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 visits opened at once, twice from each of two devices, share batched reads and
    writes; each page shows its own visit's time, and each (visit, device) has one arrival
    and one patient-joined."""
    system = launch_system
    # Starting from 30 minutes ago to 29 minutes ahead: every lobby is open.
    base = (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0)
    booked = await _visits(system, [base + timedelta(minutes=i) for i in range(60)])
    opens = [(i, token, _device(d)) for i, (_, token) in enumerate(booked) for d in (1, 2)] * 2
    lobby = system.app[LOBBY]
    sizes = hold_first(monkeypatch, lobby.visits, len(opens))
    async with _session() as http:
        answers = await asyncio.gather(*(_open(http, system, t, d) for _, t, d in opens))
    assert sizes[:2] == [1, len(opens) - 1], sizes
    for (i, token, _), (status, body) in zip(opens, answers, strict=True):
        assert status == 200, body
        assert PREJOIN in body
        assert f"/join/{token}/enter" in body
        assert f"{(base + timedelta(minutes=i)).astimezone(ZoneInfo(ZONE)):%H:%M}" in body
    arrivals, joined = await _lobby(system)
    assert len(arrivals) == len(booked) * 2
    assert set(arrivals.values()) == {1}
    assert joined == arrivals
    assert {key for key, _ in arrivals} == {key for key, _ in booked}


async def test_one_batch_of_good_cancelled_over_and_unknown_visits_answers_each(
    launch_system: LaunchSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one batched read, a booked visit opens its pre-join page, a cancelled one answers
    410 cancelled, one that is over 410 over, and a genuine link of an unknown visit 404; only
    the booked visit records an arrival."""
    system = launch_system
    now = datetime.now(UTC).replace(microsecond=0)
    (good, good_token), (cancelled, cancelled_token), (_, over_token) = await _visits(
        system, [now + timedelta(minutes=10), now + timedelta(hours=2), now - timedelta(hours=4)]
    )
    await system.app[DB_POOL].execute(
        "UPDATE appointments SET status = 'cancelled' WHERE appointment_key = $1", cancelled
    )
    secret = system.settings.join_token_secret.get_secret_value()
    unknown_token = join_tokens.mint(secret, "apt_" + "0" * 40, now + timedelta(hours=3))
    expected = [
        (good_token, 200, PREJOIN),
        (cancelled_token, 410, "This visit was cancelled"),
        (over_token, 410, "This visit is over"),
        (unknown_token, 404, "We could not find this visit"),
    ] * 3
    sizes = hold_first(monkeypatch, system.app[LOBBY].visits, len(expected))
    async with _session() as http:
        answers = await asyncio.gather(
            *(_open(http, system, token, _device(n)) for n, (token, _, _) in enumerate(expected))
        )
    assert sizes == [1, len(expected) - 1]
    for (_, status, text), (got, body) in zip(expected, answers, strict=True):
        assert (got, text in body) == (status, True), body
    arrivals, joined = await _lobby(system)
    assert {key for key, _ in arrivals} == {good}
    assert len(arrivals) == 3
    assert joined == arrivals


async def test_concurrent_opens_from_one_device_record_one_arrival(
    launch_system: LaunchSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty opens of one link from one device at once all read `not arrived` (one batch);
    they record one arrival and one patient-joined."""
    system = launch_system
    ((key, token),) = await _visits(system, [datetime.now(UTC) + timedelta(minutes=10)])
    hold_first(monkeypatch, system.app[LOBBY].visits, 20)
    async with _session() as http:
        answers = await asyncio.gather(*(_open(http, system, token, _device(7)) for _ in range(20)))
    assert {status for status, _ in answers} == {200}
    arrivals, joined = await _lobby(system)
    assert list(arrivals.values()) == [1]
    assert joined == arrivals
    assert next(iter(arrivals))[0] == key


def _arrival(key: str, participant: str, event_id: uuid.UUID | None = None) -> Arrival:
    return Arrival(
        key, participant, datetime.now(UTC), event_id or uuid.uuid4(), "patient-joined", b"{}"
    )


async def test_one_write_batch_with_the_same_device_twice_writes_one_row_each(
    launch_system: LaunchSystem,
) -> None:
    """A write batch holding the same (visit, device) five times writes one arrival and one
    outbox row for it (the batch's first), whatever the statement's join would multiply."""
    system = launch_system
    ((first, _), (second, _)) = await _visits(
        system, [datetime.now(UTC) + timedelta(minutes=10)] * 2
    )
    lobby = system.app[LOBBY]
    # Called together: the first is sent at once, the other five wait and go in one batch.
    await asyncio.gather(
        lobby.arrive(_arrival(first, "pt_a")),
        *(lobby.arrive(_arrival(second, "pt_b")) for _ in range(5)),
    )
    pool = system.app[DB_POOL]
    assert await pool.fetchval("SELECT count(*) FROM lobby_arrivals") == 2
    keys = await pool.fetch("SELECT key FROM outbox WHERE topic = 'patient-joined' ORDER BY key")
    assert sorted([first, second]) == [r["key"] for r in keys]


async def test_a_refused_write_batch_is_sent_item_by_item(launch_system: LaunchSystem) -> None:
    """A write batch Postgres refuses (one item's event id is taken) is rolled back whole and
    each item sent alone: the others are recorded once each, the bad one fails with its own
    error and leaves no arrival; sent again, nothing is written twice."""
    system = launch_system
    ((key, _),) = await _visits(system, [datetime.now(UTC) + timedelta(minutes=10)])
    lobby, pool = system.app[LOBBY], system.app[DB_POOL]
    taken = uuid.uuid4()
    good = [_arrival(key, f"pt_good{n}") for n in range(4)]
    batch = [*good[:2], _arrival(key, "pt_bad", taken), *good[2:]]

    async def send() -> list[Any]:
        # The first is sent alone at once; the rest queue behind it as one batch.
        return await asyncio.gather(
            lobby.arrive(_arrival(key, "pt_first", taken)),
            *(lobby.arrive(item) for item in batch),
            return_exceptions=True,
        )

    first, *outcomes = await send()
    assert first is None
    assert [type(o) for o in outcomes] == [
        type(None), type(None), asyncpg.UniqueViolationError, type(None), type(None)
    ]  # fmt: skip
    participants = {r["participant"] for r in await pool.fetch("SELECT * FROM lobby_arrivals")}
    assert participants == {"pt_first", *(a.participant for a in good)}
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE topic = 'patient-joined'") == 5
    await send()
    assert await pool.fetchval("SELECT count(*) FROM lobby_arrivals") == 5
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE topic = 'patient-joined'") == 5


async def test_a_write_batch_whose_connection_dies_fails_each_page_and_loses_nothing(
    launch_system: LaunchSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the backend of a batched arrival write is terminated, every page of the batch is
    a 500 and nothing was written; opened again, each device records one arrival."""
    system = launch_system
    booked = await _visits(system, [datetime.now(UTC) + timedelta(minutes=10)] * 8)
    lobby, pool = system.app[LOBBY], system.app[DB_POOL]
    write = lobby.arrivals.statement

    async def terminated(conn: Connection, items: Sequence[Arrival]) -> Sequence[None]:
        if len(items) > 1:  # the batch, not the first request's own write
            await pool.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        return await write(conn, items)

    monkeypatch.setattr(lobby.arrivals, "statement", terminated)
    hold_first(monkeypatch, lobby.arrivals, len(booked))

    async def opens() -> list[tuple[int, str]]:
        async with _session() as http:
            return await asyncio.gather(
                *(_open(http, system, token, _device(n)) for n, (_, token) in enumerate(booked))
            )

    statuses = [status for status, _ in await opens()]
    assert sorted(statuses) == [200] + [500] * (len(booked) - 1)
    arrivals, joined = await _lobby(system)
    assert len(arrivals) == 1
    assert joined == arrivals
    monkeypatch.setattr(lobby.arrivals, "statement", write)
    assert {status for status, _ in await opens()} == {200}
    arrivals, joined = await _lobby(system)
    assert len(arrivals) == len(booked)
    assert set(arrivals.values()) == {1}
    assert joined == arrivals

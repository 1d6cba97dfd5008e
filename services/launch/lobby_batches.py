"""Joins share their round trips to Postgres (the DataLoader / group-commit pattern). Each open
of a join link reads its visit, and a first open from a device writes its lobby arrival; under
load those round trips, each waking a Postgres backend on the launch process's own core, were
the largest cost of a join. So a request whose statement finds another of its kind in flight
waits in a queue, and when the one in flight returns, everything queued meanwhile (up to
`MAX_BATCH`) goes in one statement: visits read by one `unnest` of their keys, arrivals and
their `patient-joined` outbox rows written by one statement, as atomic as the single one (an
outbox row if and only if its arrival row is inserted; `ON CONFLICT DO NOTHING` keeps repeats
idempotent). A request that finds nothing in flight sends its statement at once, in its own
task: no added wait at low load. Each request gets its own answer; if Postgres refuses a batch
(rolled back whole, being one statement), each item is sent again on its own, so one bad item
fails only its request, and a lost connection fails each request of the batch with the same
error (a 5xx page, as without batching), so no page says an arrival was kept that was not.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Generic, NamedTuple, TypeVar

import asyncpg
import structlog
from aiohttp import web

from libs.common.web import DB_POOL

if TYPE_CHECKING:
    from libs.common.db import Connection

log = structlog.get_logger(__name__)
MAX_BATCH = 256
T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Sends `statement(conn, items)` for the items of concurrent callers, one batch in flight
    at a time; `statement` answers one result per item, in order."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        statement: Callable[[Connection, Sequence[T]], Awaitable[Sequence[R]]],
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._pool = pool
        self.statement = statement
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._busy = False
        self._drainer: asyncio.Task[None] | None = None

    async def load(self, item: T) -> R:
        if self._busy:
            future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
            self._queue.append((item, future))
            return await future
        self._busy = True
        try:
            async with self._pool.acquire() as conn:
                (result,) = await self.statement(conn, [item])
            return result
        finally:
            if self._queue:
                # A fresh context: the batches are nobody's request (logs, request ids).
                self._drainer = asyncio.create_task(self._drain(), context=contextvars.Context())
            else:
                self._busy = False

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                waiting = [(item, future) for item, future in batch if not future.done()]
                if waiting:
                    await self._answer(waiting)
        finally:
            self._busy = False
            self._drainer = None
            # Only when cancelled (the service stopping) is any future left unsettled.
            for _, future in [*batch, *self._queue]:
                _settle(future, RuntimeError("the service is stopping"))
            self._queue.clear()

    async def _answer(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        try:
            async with self._pool.acquire() as conn:
                try:
                    results = await self.statement(conn, items)
                except asyncpg.PostgresError as refused:
                    if len(batch) == 1:
                        raise
                    log.warning("lobby batch refused; each item alone", error=repr(refused))
                    for item, future in batch:
                        try:
                            (result,) = await self.statement(conn, [item])
                        except asyncpg.PostgresError as exc:
                            _settle(future, exc)
                        else:
                            _settle(future, result)
                    return
        except Exception as exc:  # each request of the batch gets the error
            for _, future in batch:
                _settle(future, exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result)

    async def close(self, within_s: float = 10) -> None:
        """Lets the batch in flight and those queued finish (the server has stopped taking
        requests), cancelling them after `within_s`."""
        drainer = self._drainer
        if drainer is not None:
            _, pending = await asyncio.wait([drainer], timeout=within_s)
            for task in pending:
                task.cancel()
                await asyncio.wait([task])


def _settle(future: asyncio.Future[R], outcome: R | BaseException) -> None:
    if future.done():  # its request went away meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class VisitRead(NamedTuple):
    appointment_key: str
    participant: str


class Arrival(NamedTuple):
    """A first open's lobby arrival and its encoded `patient-joined` event."""

    appointment_key: str
    participant: str
    arrived_at: datetime
    event_id: uuid.UUID
    topic: str
    payload: bytes


# The visits of a batch, and whether each device is in its visit's lobby already; `n` is the
# item's place in the batch (an unknown visit has no row).
_VISITS = (
    "SELECT q.n, a.appointment_key, a.tenant_id, a.status, a.starts_at, a.ends_at,"
    " a.time_zone, a.patient_join_url, i.organisation_name,"
    " EXISTS (SELECT 1 FROM lobby_arrivals l"
    "  WHERE l.appointment_key = a.appointment_key AND l.participant = q.participant) AS arrived"
    " FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(appointment_key, participant, n)"
    " JOIN appointments a ON a.appointment_key = q.appointment_key"
    " LEFT JOIN integrations i ON i.integration_id = a.integration_id"
)


async def _read_visits(conn: Connection, items: Sequence[VisitRead]) -> list[asyncpg.Record | None]:
    rows = await conn.fetch(
        _VISITS, [item.appointment_key for item in items], [item.participant for item in items]
    )
    found: list[asyncpg.Record | None] = [None] * len(items)
    for row in rows:
        found[row["n"] - 1] = row
    return found


# Devices a visit's lobby records. A link opened without the device cookie is a new device
# each time, and the SMS link can be forwarded: uncapped, 2,000 opens in 1.6 s made 2,000
# arrivals and patient-joined events, and analytics re-read them all at each poll. Past the
# cap the page is served and nothing is recorded. (Concurrent batches may pass it by a few.)
MAX_DEVICES_PER_VISIT = 50

# The arrivals of a batch and their outbox rows, in one statement: an outbox row joins only an
# arrival row this statement inserted.
_ARRIVALS = (
    "WITH arrival AS (INSERT INTO lobby_arrivals (appointment_key, participant, arrived_at)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(k, p, at)"
    " WHERE (SELECT count(*) FROM lobby_arrivals l WHERE l.appointment_key = u.k) < $7"
    " ON CONFLICT DO NOTHING RETURNING appointment_key, participant)"
    " INSERT INTO outbox (event_id, topic, key, payload)"
    " SELECT e.event_id, e.topic, e.appointment_key, e.payload"
    " FROM unnest($1::text[], $2::text[], $4::uuid[], $5::text[], $6::bytea[])"
    "  AS e(appointment_key, participant, event_id, topic, payload)"
    " JOIN arrival USING (appointment_key, participant)"
)


async def _write_arrivals(conn: Connection, items: Sequence[Arrival]) -> list[None]:
    # One row per (visit, device): the first of concurrent opens from one device; in key
    # order, so two replicas' batches take the rows' locks in the same order.
    first: dict[tuple[str, str], Arrival] = {}
    for item in items:
        first.setdefault((item.appointment_key, item.participant), item)
    rows = [first[pair] for pair in sorted(first)]
    await conn.execute(
        _ARRIVALS,
        [row.appointment_key for row in rows],
        [row.participant for row in rows],
        [row.arrived_at for row in rows],
        [row.event_id for row in rows],
        [row.topic for row in rows],
        [row.payload for row in rows],
        MAX_DEVICES_PER_VISIT,
    )
    return [None] * len(items)


class Lobby:
    """The join page's two statements, batched across concurrent requests."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.visits = Batcher(pool, _read_visits)
        self.arrivals = Batcher(pool, _write_arrivals)

    async def visit(self, appointment_key: str, participant: str) -> asyncpg.Record | None:
        """The visit's row with `arrived` for this device; None for no such visit."""
        return await self.visits.load(VisitRead(appointment_key, participant))

    async def arrive(self, arrival: Arrival) -> None:
        """Records the arrival and its event, unless this device arrived already."""
        await self.arrivals.load(arrival)

    async def close(self) -> None:
        await asyncio.gather(self.visits.close(), self.arrivals.close())


LOBBY = web.AppKey("lobby_batches", Lobby)


async def lobby_batches_ctx(app: web.Application) -> AsyncIterator[None]:
    app[LOBBY] = Lobby(app[DB_POOL])
    yield
    await app[LOBBY].close()

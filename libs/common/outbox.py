"""Transactional outbox: write events with the change, publish them after commit.

`enqueue` runs inside the caller's transaction, so an event exists if and only if the change
it announces committed. `OutboxRelay` publishes pending rows in id order with
`FOR UPDATE SKIP LOCKED`, so several replicas can relay without publishing a row twice in
the normal case; a crash between send and mark re-sends, which consumers' inboxes absorb.
Published rows are kept for a short retention (for operators), then the relay deletes them:
an event's payload may carry field ciphertext (a patient's phone), which must not outlive its
use, and the table would otherwise grow without bound.

A batch whose deliveries are not all acknowledged within the delivery timeout (the broker is
away: the idempotent producer never expires a batch by itself) is rolled back and retried after
a backoff, so no round holds its rows locked for longer than that timeout. A row the broker
refuses for good (larger than it accepts) is parked with the reason and the rest of its batch
goes out: one such row would otherwise roll back every batch it is in and hold back every later
event of the service. Parked rows are never swept; they wait for an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from libs.common.events import Envelope, encode_event
from libs.common.metrics import (
    OUTBOX_OLDEST_PENDING_AGE,
    OUTBOX_PARKED,
    OUTBOX_PARKED_ROWS,
    OUTBOX_PUBLISHED,
    OUTBOX_RELAY_ERRORS,
    OUTBOX_SWEPT,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    from libs.common.db import Connection

log = structlog.get_logger(__name__)


async def enqueue(conn: Connection, event: Envelope[Any]) -> None:
    if not conn.is_in_transaction():
        raise RuntimeError("outbox.enqueue must run inside the transaction of the change")
    await conn.execute(
        "INSERT INTO outbox (event_id, topic, key, payload) VALUES ($1, $2, $3, $4)",
        event.event_id,
        event.type,
        event.key,
        encode_event(event),
    )


# RETURNING does not keep the subquery's order: the caller sorts by id, so each key's events
# go out in the order they were written.
_CLAIM = (
    "UPDATE outbox SET published_at = now() WHERE id IN (SELECT id FROM outbox"
    " WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT $1"
    " FOR UPDATE SKIP LOCKED)"
    " RETURNING id, event_id, topic, key, payload"
)
# A claimed row the broker refused for good: pending no more, never published, kept with why.
_PARK = "UPDATE outbox SET published_at = NULL, parked_at = now(), parked_reason = $2 WHERE id = $1"
# Published rows older than the retention, oldest first, a bounded batch at a time; a pending
# or parked row (published_at NULL) never matches. No index on published_at: the table holds
# only what was published within the retention plus the pending rows (a few minutes of
# events), and the oldest rows come first in the primary key's order, which LIMIT stops early on.
_SWEEP = (
    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
    " WHERE published_at < now() - $1::interval ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)"
)
# How long the oldest pending row has waited (NULL when none), from the pending rows' index,
# and how many rows are parked (from theirs).
_MEASURE = (
    "SELECT extract(epoch FROM now() - (SELECT created_at FROM outbox"
    " WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT 1))::float8"
    " AS oldest_pending_s,"
    " (SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL) AS parked"
)
# What the producer says about one record before sending it, and will say again however
# often it is sent: such a row is parked. Only the producer's refusals: after the broker
# refuses a batch of an idempotent producer, that producer's next batches to the partition are
# refused as out of sequence (the broker stored nothing, the producer's sequence moved on), so
# parking the row would not unblock the rows behind it. The producer's max_request_size (1 MiB)
# is below the broker's default max.message.bytes, so a row too large for Kafka is refused here
# unless a topic sets a lower max.message.bytes (ours do not; see _BROKER_REFUSED).
REFUSED_FOR_GOOD: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
)
# The broker refusing a record: a failed round like any other (rolled back, counted, retried,
# the relay and backlog alerts fire), logged with what to fix. CORRUPT_MESSAGE is a CRC failure,
# possibly in transit: retried too.
_BROKER_REFUSED: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
)

# create_producer's request_timeout_ms: a healthy broker acknowledges well within it.
DELIVERY_TIMEOUT_S = 15.0

# Called after every round of the running relay with (events published, rows swept).
RoundObserver = Callable[[int, int], None]


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        *,
        schema: str,
        topic_prefix: str = "",
        batch_size: int = 200,
        poll_interval_s: float = 1.0,
        retention_minutes: float = 10,
        sweep_interval_s: float = 60.0,
        sweep_batch_size: int = 5000,
        delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
        measure_interval_s: float = 15.0,
    ) -> None:
        self._pool = pool
        self._producer = producer
        self._channel = f"outbox_{schema}"
        self._prefix = topic_prefix
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._retention = timedelta(minutes=retention_minutes)
        self._sweep_interval_s = sweep_interval_s
        self._sweep_batch_size = sweep_batch_size
        self._next_sweep = 0.0  # monotonic; the first idle round sweeps
        self._sweep_backoff = 0.2
        self._delivery_timeout_s = delivery_timeout_s
        self._measure_interval_s = measure_interval_s
        self._next_measure = 0.0  # monotonic; the first round measures
        self._observers: list[RoundObserver] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listener: PoolConnectionProxy[asyncpg.Record] | None = None

    def observe(self, observer: RoundObserver) -> None:
        self._observers.append(observer)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await self._pool.acquire()
            try:
                await conn.add_listener(self._channel, self._on_notify)
            except BaseException:
                await self._pool.release(conn)
                raise
            self._listener = conn

    async def publish_pending(self) -> int:
        """Publish one batch; returns how many events went out (parked rows not counted)."""
        published, _claimed = await self._publish_batch()
        return published

    async def _publish_batch(self) -> tuple[int, int]:
        """One batch: (events published, rows claimed, the parked ones included)."""
        async with self._pool.acquire() as conn, conn.transaction():
            # Marked in the same statement that locks them (one round trip less than a
            # SELECT then an UPDATE); the mark commits only after every send is acknowledged,
            # and any failure rolls it back.
            rows = sorted(await conn.fetch(_CLAIM, self._batch_size), key=lambda row: row["id"])
            if not rows:
                return 0, 0
            try:
                async with asyncio.timeout(self._delivery_timeout_s):
                    refused = await self._deliver(rows)
            except TimeoutError:
                # Rolled back: the rows are pending again and unlocked. The producer may still
                # deliver what it holds once the broker is back, and the next round sends the
                # rows again: a duplicate, which the consumers' inboxes absorb (same event_id).
                log.warning(
                    "outbox batch not acknowledged in time, rolled back",
                    events=len(rows),
                    timeout_s=self._delivery_timeout_s,
                )
                raise
            if refused:
                await conn.executemany(_PARK, list(refused.items()))
        for row in rows:
            why = refused.get(row["id"])
            if why is None:
                OUTBOX_PUBLISHED.labels(topic=row["topic"]).inc()
                continue
            OUTBOX_PARKED.labels(topic=row["topic"]).inc()
            log.error(
                "outbox row parked: the broker refuses it for good",
                topic=row["topic"],
                outbox_id=row["id"],
                event_id=str(row["event_id"]),
                reason=why,
            )
        return len(rows) - len(refused), len(rows)

    async def _deliver(self, rows: list[asyncpg.Record]) -> dict[int, str]:
        """Sends the rows and waits for every acknowledgement; returns the ids of the rows
        refused for good, with why. Any other failure raises (the batch rolls back and is sent
        again)."""
        refused: dict[int, str] = {}
        sent: list[tuple[asyncpg.Record, asyncio.Future[Any]]] = []
        for row in rows:
            try:
                delivery = await self._producer.send(
                    self._prefix + row["topic"],
                    value=bytes(row["payload"]),
                    key=row["key"].encode(),
                )
            except REFUSED_FOR_GOOD as exc:  # e.g. larger than max_request_size
                refused[row["id"]] = _reason(exc)
            else:
                sent.append((row, delivery))
        outcomes = await asyncio.gather(*(d for _, d in sent), return_exceptions=True)
        failure: BaseException | None = None
        for (row, _), outcome in zip(sent, outcomes, strict=True):
            if isinstance(outcome, _BROKER_REFUSED):
                log.error(
                    "outbox row refused by the broker; every later row of its partition waits"
                    " behind it: check the topic's max.message.bytes (must not be below the"
                    " producer's 1 MiB max_request_size) and the broker's log",
                    topic=row["topic"],
                    outbox_id=row["id"],
                    reason=_reason(outcome),
                )
            if isinstance(outcome, BaseException) and failure is None:
                failure = outcome
        if failure is not None:
            raise failure
        return refused

    async def measure(self) -> None:
        """Exports how long the oldest pending row has waited (outbox_oldest_pending_age_seconds;
        0 when none is pending) and how many rows are parked (outbox_parked_rows). The age
        keeps growing between measurements, so a relay that stops measuring (stuck, or
        Postgres away) still shows its backlog getting older."""
        async with asyncio.timeout(5), self._pool.acquire() as conn:
            row = await conn.fetchrow(_MEASURE)
        assert row is not None
        OUTBOX_OLDEST_PENDING_AGE.set_function(_ageing(row["oldest_pending_s"]))
        OUTBOX_PARKED_ROWS.set(row["parked"])

    async def _measure_if_due(self) -> None:
        if time.monotonic() < self._next_measure:
            return
        self._next_measure = time.monotonic() + self._measure_interval_s
        try:
            await self.measure()
        except Exception as exc:  # the round that failed already counted and logged it
            log.debug("outbox backlog not measured", error=type(exc).__name__)

    async def sweep_published(self) -> int:
        """Delete one batch of rows published longer than the retention ago; returns how many
        went. A pending row is never deleted."""
        async with self._pool.acquire() as conn:
            status = await conn.execute(_SWEEP, self._retention, self._sweep_batch_size)
        swept = int(status.split()[-1])
        OUTBOX_SWEPT.inc(swept)
        return swept

    async def _sweep_if_due(self) -> tuple[int, bool]:
        """At most once per sweep interval, one sweep batch: (rows swept, whether more are
        left, in which case the next round sweeps again after publishing). A failure is
        logged and retried later, slower each time, without holding up publishing."""
        if time.monotonic() < self._next_sweep:
            return 0, False
        try:
            swept = await self.sweep_published()
        except Exception as exc:
            OUTBOX_RELAY_ERRORS.inc()
            log.warning(
                "outbox sweep failed, will retry",
                error=type(exc).__name__,
                retry_in_s=self._sweep_backoff,
            )
            self._next_sweep = time.monotonic() + self._sweep_backoff
            self._sweep_backoff = min(self._sweep_backoff * 2, 10.0)
            return 0, False
        self._sweep_backoff = 0.2
        if swept >= self._sweep_batch_size:
            return swept, True
        self._next_sweep = time.monotonic() + self._sweep_interval_s
        return swept, False

    async def run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                await self._ensure_listener()
                published, claimed = await self._publish_batch()
                backoff = 0.2
            except Exception as exc:
                # Kafka or Postgres is away; keep the rows and try again, slower each time.
                OUTBOX_RELAY_ERRORS.inc()
                log.warning(
                    "outbox relay failed, will retry", error=type(exc).__name__, retry_in_s=backoff
                )
                await self._release_listener()
                await self._measure_if_due()
                await self._sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backlog = claimed >= self._batch_size
            # Never while a backlog is pending: publishing comes first.
            swept, more = (0, False) if backlog else await self._sweep_if_due()
            await self._measure_if_due()
            for observer in self._observers:
                observer(published, swept)
            if not backlog and not more:
                await self._sleep(self._poll_interval_s)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                stop = asyncio.ensure_future(self._stopping.wait())
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({stop, wake}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    wake.cancel()

    async def _release_listener(self) -> None:
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        with contextlib.suppress(Exception):
            await listener.remove_listener(self._channel, self._on_notify)
        with contextlib.suppress(Exception):
            await self._pool.release(listener)

    async def stop(self) -> None:
        self._stopping.set()
        await self._release_listener()


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def _ageing(age_s: float | None) -> Callable[[], float]:
    """The age of the oldest pending row as of now, from its age when it was measured."""
    if age_s is None:
        return lambda: 0.0
    measured = time.monotonic()
    return lambda: age_s + time.monotonic() - measured

"""Transactional outbox: write events with the change, publish them after commit.

`enqueue` runs inside the caller's transaction, so an event exists if and only if the change
it announces committed. `OutboxRelay` publishes pending rows in id order with
`FOR UPDATE SKIP LOCKED`, so several replicas can relay without publishing a row twice in
the normal case; a crash between send and mark re-sends, which consumers' inboxes absorb.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer

from libs.common.events import Envelope, encode_event
from libs.common.metrics import OUTBOX_PUBLISHED, OUTBOX_RELAY_ERRORS

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
    " WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)"
    " RETURNING id, topic, key, payload"
)


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
    ) -> None:
        self._pool = pool
        self._producer = producer
        self._channel = f"outbox_{schema}"
        self._prefix = topic_prefix
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listener: PoolConnectionProxy[asyncpg.Record] | None = None

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
        """Publish one batch; returns how many events went out."""
        async with self._pool.acquire() as conn, conn.transaction():
            # Marked in the same statement that locks them (one round trip less than a
            # SELECT then an UPDATE); the mark commits only after every send is acknowledged,
            # and any failure rolls it back.
            rows = sorted(await conn.fetch(_CLAIM, self._batch_size), key=lambda row: row["id"])
            if not rows:
                return 0
            deliveries = [
                await self._producer.send(
                    self._prefix + row["topic"],
                    value=bytes(row["payload"]),
                    key=row["key"].encode(),
                )
                for row in rows
            ]
            await asyncio.gather(*deliveries)
        for row in rows:
            OUTBOX_PUBLISHED.labels(topic=row["topic"]).inc()
        return len(rows)

    async def run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                await self._ensure_listener()
                published = await self.publish_pending()
                backoff = 0.2
            except Exception as exc:
                # Kafka or Postgres is away; keep the rows and try again, slower each time.
                OUTBOX_RELAY_ERRORS.inc()
                log.warning(
                    "outbox relay failed, will retry", error=type(exc).__name__, retry_in_s=backoff
                )
                await self._release_listener()
                await self._sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if published < self._batch_size:
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

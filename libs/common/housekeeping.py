"""Deletes rows a service no longer needs, in bounded batches, once an interval.

Two kinds, each registered by its owner as an `Expiry`:
- dedupe keys (the consumers' inbox, webhook deliveries) older than anything that can still be
  delivered again: the inbox outlives a record's whole life in its topic, see
  `inbox_expiry`, so a redelivery still finds its row;
- expired sign-in state (launch's SMART states and provider sessions), which holds encrypted
  EHR tokens that nothing will read again.

Without it those tables grow with every event and launch for as long as the service runs.
"""

# ruff: noqa: S608 -- statements are built from each Expiry's constant table and condition.
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import structlog

from libs.common.events import COMPACTED_TOPICS
from libs.common.metrics import HOUSEKEEPING_FAILURES, HOUSEKEEPING_SWEPT

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Expiry:
    """Rows of `table` matching `condition` (SQL over the table's columns; `$2` onwards are
    `params`, `$1` is taken by the batch size) are deleted. `index` (name, column list) is
    built before the first sweep when the table is too large to scan every round."""

    table: str
    condition: str
    params: tuple[object, ...] = ()
    index: tuple[str, str] | None = None

    def statement(self) -> str:
        # The condition is checked again on the row deleted: a row updated since the inner
        # scan (a new ctid) is left for the next round instead of deleted unchecked.
        return (
            f"DELETE FROM {self.table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {self.table}"
            f" WHERE {self.condition} LIMIT $1)) AND {self.condition}"
        )


def inbox_expiry(retention: timedelta) -> Expiry:
    """Inbox rows older than `retention`. The compacted topics keep each key's last event for
    good and their consumers keep only newer versions anyway, so their few rows stay."""
    return Expiry(
        "inbox",
        "processed_at < now() - $2::interval AND topic <> ALL($3::text[])",
        (retention, sorted(str(topic) for topic in COMPACTED_TOPICS)),
        index=("inbox_processed_at", "processed_at"),
    )


# Built CONCURRENTLY, outside any transaction and without the pool's statement timeout: on an
# installation that ran before the housekeeper the inbox is its largest table, and a plain
# CREATE INDEX in a migration would hold off every consumer's inbox insert (the old pods'
# too, during a rollout) and fail the migration past 30 s. One replica builds it (advisory
# lock); a build cut short leaves an invalid index, dropped and built again next time.
_INDEX_STATE = (
    "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
    " WHERE c.relname = $1 AND c.relnamespace = to_regnamespace(current_schema())"
)
_INDEX_BUILD_TIMEOUT_S = 6 * 3600.0


class Housekeeper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        expiries: Sequence[Expiry],
        *,
        interval_s: float,
        batch_size: int = 5000,
    ) -> None:
        self._pool = pool
        self._expiries = list(expiries)
        self._interval_s = interval_s
        self._batch_size = batch_size
        self._stopping = asyncio.Event()
        # Set after each round, failed or not (tests wait on it; clear it to wait for the next).
        self.round_done = asyncio.Event()

    async def ensure_index(self, expiry: Expiry) -> bool:
        """Whether the expiry's index (if it has one) is there and valid to sweep by: built
        here if missing, or False while another replica builds it."""
        if expiry.index is None:
            return True
        name, columns = expiry.index
        async with self._pool.acquire() as conn:
            if await conn.fetchval(_INDEX_STATE, name) is True:
                return True
            # Only try: a session waiting for the lock is a transaction CREATE INDEX
            # CONCURRENTLY would wait for in turn, a deadlock between two starting replicas.
            lock = f"housekeeping-index:{name}"
            if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock):
                return False
            try:
                valid = await conn.fetchval(_INDEX_STATE, name)
                if valid is True:
                    return True
                if valid is False:
                    await conn.execute(f'DROP INDEX CONCURRENTLY "{name}"')
                log.info("building index for housekeeping", index=name, table=expiry.table)
                await conn.execute(
                    f'CREATE INDEX CONCURRENTLY "{name}" ON {expiry.table} ({columns})',
                    timeout=_INDEX_BUILD_TIMEOUT_S,
                )
                log.info("index for housekeeping built", index=name)
                return True
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock)

    async def sweep(self) -> dict[str, int]:
        """Deletes every expired row, a batch per transaction; returns how many per table.
        After each batch it pauses as long as the batch took, so a first sweep over months
        of rows spreads its writes (and WAL, and replication) over time."""
        swept: dict[str, int] = {}
        for expiry in self._expiries:
            if not await self.ensure_index(expiry):
                continue  # another replica is building its index; next round
            statement, total = expiry.statement(), 0
            while not self._stopping.is_set():
                started = time.monotonic()
                status = await self._pool.execute(statement, self._batch_size, *expiry.params)
                deleted = int(status.split()[-1])
                total += deleted
                HOUSEKEEPING_SWEPT.labels(expiry.table).inc(deleted)
                if deleted < self._batch_size:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._stopping.wait(), timeout=time.monotonic() - started
                    )
            swept[expiry.table] = total
        return swept

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                swept = await self.sweep()
                if any(swept.values()):
                    log.info("expired rows deleted", **swept)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Nothing depends on a sweep being on time: the next interval tries again.
                # TimeoutError: the pool's statement timeout, which would end the task.
                HOUSEKEEPING_FAILURES.inc()
                log.warning("housekeeping failed, will retry", error=type(exc).__name__)
            self.round_done.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval_s)

    def stop(self) -> None:
        self._stopping.set()

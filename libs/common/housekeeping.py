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
    `params`, `$1` is taken by the batch size) are deleted."""

    table: str
    condition: str
    params: tuple[object, ...] = ()

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
    )


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

    async def sweep(self) -> dict[str, int]:
        """Deletes every expired row, a batch per transaction; returns how many per table."""
        swept: dict[str, int] = {}
        for expiry in self._expiries:
            statement, total = expiry.statement(), 0
            while not self._stopping.is_set():
                status = await self._pool.execute(statement, self._batch_size, *expiry.params)
                deleted = int(status.split()[-1])
                total += deleted
                HOUSEKEEPING_SWEPT.labels(expiry.table).inc(deleted)
                if deleted < self._batch_size:
                    break
            swept[expiry.table] = total
        return swept

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                swept = await self.sweep()
                if any(swept.values()):
                    log.info("expired rows deleted", **swept)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Nothing depends on a sweep being on time: the next interval tries again.
                HOUSEKEEPING_FAILURES.inc()
                log.warning("housekeeping failed, will retry", error=type(exc).__name__)
            self.round_done.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval_s)

    def stop(self) -> None:
        self._stopping.set()

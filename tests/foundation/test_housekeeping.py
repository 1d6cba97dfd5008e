from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg

from libs.common.events import Topic
from libs.common.housekeeping import Expiry, Housekeeper, inbox_expiry
from libs.common.inbox import first_deliveries
from tests.conftest import wait_for
from tests.support.probe import probe_pool

RETENTION = timedelta(days=30)


async def _deliver(pool: asyncpg.Pool, topic: str, count: int, age: timedelta) -> list[uuid.UUID]:
    """`count` events applied by the probe consumer `age` ago; their ids."""
    ids = [uuid.uuid4() for _ in range(count)]
    async with pool.acquire() as conn, conn.transaction():
        assert await first_deliveries(conn, "probe", [(i, topic) for i in ids]) == [True] * count
        await conn.execute(
            "UPDATE inbox SET processed_at = processed_at - $1::interval"
            " WHERE event_id = ANY($2::uuid[])",
            age,
            ids,
        )
    return ids


async def _redelivered(pool: asyncpg.Pool, ids: list[uuid.UUID], topic: str) -> list[bool]:
    """Whether each event would be applied again (True: its inbox row is gone)."""
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            return await first_deliveries(conn, "probe", [(i, topic) for i in ids])
        finally:
            await tx.rollback()


async def test_inbox_rows_older_than_the_retention_are_deleted_in_batches(
    database_url: str,
) -> None:
    """Inbox rows older than the retention go, a batch at a time; newer rows and those of the
    compacted topics stay, so a redelivery within the retention is still a duplicate."""
    pool = await probe_pool(database_url)
    try:
        old = await _deliver(pool, Topic.PATIENT_JOINED, 5, RETENTION + timedelta(hours=1))
        recent = await _deliver(pool, Topic.PATIENT_JOINED, 2, RETENTION - timedelta(hours=1))
        config = await _deliver(pool, Topic.INTEGRATION_CONFIG, 1, RETENTION * 10)
        housekeeper = Housekeeper(pool, [inbox_expiry(RETENTION)], interval_s=3600, batch_size=2)

        assert await housekeeper.sweep() == {"inbox": 5}
        assert await _redelivered(pool, old, Topic.PATIENT_JOINED) == [True] * 5
        assert await _redelivered(pool, recent, Topic.PATIENT_JOINED) == [False, False]
        assert await _redelivered(pool, config, Topic.INTEGRATION_CONFIG) == [False]
        assert await housekeeper.sweep() == {"inbox": 0}
    finally:
        await pool.close()


async def test_a_running_housekeeper_sweeps_at_once_and_stops_without_waiting(
    database_url: str,
) -> None:
    """The housekeeper's first round runs when it starts, not an interval later, and stop()
    ends it at once though its next round is an hour away."""
    pool = await probe_pool(database_url)
    try:
        await _deliver(pool, Topic.MEETING_ENDED, 3, RETENTION * 2)
        await pool.execute("CREATE TABLE sign_ins (expires_at timestamptz NOT NULL)")
        await pool.execute(
            "INSERT INTO sign_ins VALUES (now() - interval '1 minute'), (now() + interval '1 hour')"
        )
        housekeeper = Housekeeper(
            pool,
            [inbox_expiry(RETENTION), Expiry("sign_ins", "expires_at < now()")],
            interval_s=3600,
        )
        task = asyncio.create_task(housekeeper.run())
        await wait_for(housekeeper.round_done, "the first housekeeping round")
        assert await pool.fetchval("SELECT count(*) FROM inbox") == 0
        assert await pool.fetchval("SELECT count(*) FROM sign_ins") == 1
        housekeeper.stop()
        await asyncio.wait_for(task, timeout=5)
    finally:
        await pool.close()


async def _index_valid(pool: asyncpg.Pool) -> bool | None:
    valid: bool | None = await pool.fetchval(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = 'inbox_processed_at'"
        " AND c.relnamespace = to_regnamespace(current_schema())"
    )
    return valid


async def test_the_inbox_index_is_built_concurrently_and_rebuilt_when_invalid(
    database_url: str,
) -> None:
    """The first sweep builds the inbox's index on processed_at outside the migrations (so
    a large inbox never holds a migration up); an invalid one left by a cut-short build is
    dropped and built again; the sweep then finds its rows by it."""
    pool = await probe_pool(database_url)
    try:
        assert await _index_valid(pool) is None
        housekeeper = Housekeeper(pool, [inbox_expiry(RETENTION)], interval_s=3600)
        await housekeeper.sweep()
        assert await _index_valid(pool) is True
        # What a build cut short by a stopping pod leaves behind.
        await pool.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid ="
            " to_regclass(current_schema() || '.inbox_processed_at')"
        )
        assert await _index_valid(pool) is False
        await _deliver(pool, Topic.PATIENT_JOINED, 3, RETENTION * 2)
        assert await housekeeper.sweep() == {"inbox": 3}
        assert await _index_valid(pool) is True
    finally:
        await pool.close()

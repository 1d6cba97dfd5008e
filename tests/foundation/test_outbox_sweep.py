from __future__ import annotations

import asyncio

import asyncpg

from libs.common.outbox import OutboxRelay, enqueue
from tests.conftest import KAFKA, wait_for
from tests.support.kafka_reader import read_all
from tests.support.probe import patient_joined, probe_pool, probe_topics, started_producer


async def enqueue_joins(pool: asyncpg.Pool, key: str, count: int) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for _ in range(count):
            await enqueue(conn, patient_joined(key))


async def test_sweep_deletes_only_rows_published_longer_than_the_retention_ago(
    database_url: str, topic_prefix: str
) -> None:
    """A sweep deletes published rows older than the retention, in bounded batches, and never
    a pending row or one published more recently."""
    await probe_topics(KAFKA, topic_prefix)
    pool = await probe_pool(database_url)
    producer = await started_producer(KAFKA)
    relay = OutboxRelay(
        pool,
        producer,
        schema="probe",
        topic_prefix=topic_prefix,
        retention_minutes=10,
        sweep_batch_size=2,
    )
    try:
        await enqueue_joins(pool, "apt_old", 3)
        await enqueue_joins(pool, "apt_recent", 1)
        assert await relay.publish_pending() == 4
        # Published 11 minutes ago, as far as the sweep can tell.
        await pool.execute(
            "UPDATE outbox SET published_at = published_at - interval '11 minutes'"
            " WHERE key = 'apt_old'"
        )
        # Pending rows, one of them written long ago (the broker was away): never swept.
        await enqueue_joins(pool, "apt_pending", 2)
        await pool.execute(
            "UPDATE outbox SET created_at = created_at - interval '1 day'"
            " WHERE id = (SELECT min(id) FROM outbox WHERE key = 'apt_pending')"
        )

        assert [await relay.sweep_published() for _ in range(3)] == [2, 1, 0]
        left = await pool.fetch("SELECT key, published_at IS NULL AS pending FROM outbox")
        assert sorted((r["key"], r["pending"]) for r in left) == [
            ("apt_pending", True),
            ("apt_pending", True),
            ("apt_recent", False),
        ]
    finally:
        await producer.stop()
        await pool.close()


async def test_running_relay_sweeps_between_publishing_and_keeps_publishing(
    database_url: str, topic_prefix: str
) -> None:
    """The running relay publishes a backlog before it sweeps, sweeps in bounded batches each
    after a publish, and publishes what is written after the sweep."""
    await probe_topics(KAFKA, topic_prefix)
    pool = await probe_pool(database_url)
    producer = await started_producer(KAFKA)
    relay = OutboxRelay(
        pool,
        producer,
        schema="probe",
        topic_prefix=topic_prefix,
        batch_size=2,
        poll_interval_s=5,
        retention_minutes=0,
        sweep_interval_s=0,
        sweep_batch_size=2,
    )
    rounds: list[tuple[int, int]] = []
    swept_all = asyncio.Event()
    expected_swept = 4

    def observe(published: int, swept: int) -> None:
        rounds.append((published, swept))
        if sum(s for _, s in rounds) >= expected_swept:
            swept_all.set()

    relay.observe(observe)
    await enqueue_joins(pool, "apt_backlog", 4)
    task = asyncio.create_task(relay.run())
    try:
        await wait_for(swept_all, "the relay to publish and sweep the backlog")
        first_sweep = next(i for i, (_, swept) in enumerate(rounds) if swept)
        # The backlog went out in full batches before any sweep; none swept while one was due.
        assert sum(p for p, _ in rounds[:first_sweep]) == 4
        assert all(not swept for published, swept in rounds if published == 2)
        # Each sweep batch is bounded and its own round (which publishes first).
        assert all(swept <= 2 for _, swept in rounds)
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0

        swept_all.clear()
        expected_swept = 7
        await enqueue_joins(pool, "apt_after_sweep", 3)
        published = await read_all(topic_prefix + "patient-joined", expect=7)
        assert len(published) == 7
        await wait_for(swept_all, "the relay to sweep what it published after the sweep")
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await relay.stop()
        await asyncio.wait_for(task, 5)
        await producer.stop()
        await pool.close()

from __future__ import annotations

import asyncio

import pytest

from libs.common.events import decode_event
from libs.common.outbox import OutboxRelay, enqueue
from tests.conftest import KAFKA
from tests.support.kafka_reader import read_all
from tests.support.probe import patient_joined, probe_pool, probe_topics, started_producer


async def test_rolled_back_transaction_publishes_nothing(
    database_url: str, topic_prefix: str
) -> None:
    """An event enqueued in a transaction that rolls back never reaches Kafka."""
    await probe_topics(KAFKA, topic_prefix)
    pool = await probe_pool(database_url)
    producer = await started_producer(KAFKA)
    relay = OutboxRelay(pool, producer, schema="probe", topic_prefix=topic_prefix)
    try:
        kept, discarded = patient_joined("apt_kept"), patient_joined("apt_discarded")
        async with pool.acquire() as conn:
            with pytest.raises(RuntimeError, match="domain change failed"):  # noqa: PT012
                async with conn.transaction():
                    await enqueue(conn, discarded)
                    raise RuntimeError("domain change failed")
            async with conn.transaction():
                await enqueue(conn, kept)
        assert await relay.publish_pending() == 1
        assert await relay.publish_pending() == 0

        published = await read_all(topic_prefix + "patient-joined", expect=1)
        assert [decode_event(v).event_id for v in published] == [kept.event_id]
    finally:
        await producer.stop()
        await pool.close()


async def test_outbox_requires_the_callers_transaction(database_url: str) -> None:
    """Enqueueing outside a transaction is refused, so no event can outlive its change."""
    pool = await probe_pool(database_url)
    try:
        async with pool.acquire() as conn:
            with pytest.raises(RuntimeError, match="inside the transaction"):
                await enqueue(conn, patient_joined())
    finally:
        await pool.close()


async def test_relay_publishes_committed_events_in_order_with_their_key(
    database_url: str, topic_prefix: str
) -> None:
    """The running relay publishes committed events, keyed by appointment key, in order."""
    await probe_topics(KAFKA, topic_prefix)
    pool = await probe_pool(database_url)
    producer = await started_producer(KAFKA)
    relay = OutboxRelay(
        pool, producer, schema="probe", topic_prefix=topic_prefix, poll_interval_s=5
    )
    task = asyncio.create_task(relay.run())
    try:
        events = [patient_joined("apt_same") for _ in range(5)]
        async with pool.acquire() as conn, conn.transaction():
            for event in events:
                await enqueue(conn, event)
        published = await read_all(topic_prefix + "patient-joined", expect=5)
        assert [decode_event(v).event_id for v in published] == [e.event_id for e in events]
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    finally:
        await relay.stop()
        await asyncio.wait_for(task, 5)
        await producer.stop()
        await pool.close()

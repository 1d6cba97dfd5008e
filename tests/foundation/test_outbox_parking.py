"""Outbox rows the producer refuses for good are parked, not retried in front of every later
event; a broker refusal fails the round loudly instead."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import MessageSizeTooLargeError
from prometheus_client import REGISTRY

from libs.common.events import (
    AttendanceInterval,
    Envelope,
    MeetingEndedV1,
    ParticipantAttendance,
    Topic,
    decode_event,
    encode_event,
    make_event,
)
from libs.common.outbox import OutboxRelay, enqueue
from tests.conftest import KAFKA
from tests.support.kafka_reader import read_all
from tests.support.probe import patient_joined, probe_pool, probe_topics, started_producer


def meeting_ended(participants: int, intervals: int) -> Envelope[Any]:
    """A legal MeetingEndedV1 (the model allows 500 participants of 500 intervals each)."""
    t0 = datetime(2030, 1, 7, 14, 0, tzinfo=UTC)
    attended = [
        AttendanceInterval(
            joined_at=t0 + timedelta(seconds=i), left_at=t0 + timedelta(seconds=i + 1)
        )
        for i in range(intervals)
    ]
    payload = MeetingEndedV1(
        meeting_ended_at=t0 + timedelta(hours=1),
        participants=[
            ParticipantAttendance(participant=f"pp_{n:020d}", role="guest", intervals=attended)
            for n in range(participants)
        ],
    )
    return make_event(Topic.MEETING_ENDED, "tenant-probe", "apt_big", payload)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_row_larger_than_the_producer_accepts_is_parked_and_the_rest_go_out(
    database_url: str, topic_prefix: str
) -> None:
    """A row over max_request_size is parked with its reason in the round that meets it; the
    events after it go out, the sweep keeps it, and the parked-rows gauge counts it."""
    await probe_topics(KAFKA, topic_prefix)
    pool = await probe_pool(database_url)
    producer = await started_producer(KAFKA)
    relay = OutboxRelay(pool, producer, schema="probe", topic_prefix=topic_prefix)
    try:
        big = meeting_ended(participants=200, intervals=100)
        assert len(encode_event(big)) > 1_048_576
        later = patient_joined("apt_other")
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, big)
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, later)
        parked_before = sample("outbox_parked_total", topic="meeting-ended")

        assert await relay.publish_pending() == 1
        assert await relay.publish_pending() == 0

        [published] = await read_all(topic_prefix + "patient-joined", expect=1)
        assert decode_event(published).event_id == later.event_id
        row = await pool.fetchrow(
            "SELECT published_at, parked_at, parked_reason FROM outbox WHERE event_id = $1",
            big.event_id,
        )
        assert row is not None
        assert row["published_at"] is None
        assert row["parked_at"] is not None
        assert row["parked_reason"].startswith("MessageSizeTooLargeError")
        assert sample("outbox_parked_total", topic="meeting-ended") == parked_before + 1

        # Parked long ago, as far as the sweep can tell: still kept, for an operator.
        await pool.execute("UPDATE outbox SET created_at = created_at - interval '1 day'")
        await relay.sweep_published()
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL") == 1
        await relay.measure()
        assert sample("outbox_parked_rows") == 1
        assert sample("outbox_oldest_pending_age_seconds") == 0  # parked is not pending
    finally:
        await producer.stop()
        await pool.close()


async def test_a_row_the_broker_refuses_is_not_parked_but_fails_the_round_loudly(
    database_url: str, topic_prefix: str
) -> None:
    """A row the broker answers MESSAGE_TOO_LARGE for (a topic whose max.message.bytes is below
    the producer's limit) fails the round: nothing is marked, so nothing is lost, and the error
    names the topic. (Parking it would not help: the idempotent producer's later batches to
    that partition are refused as out of sequence.)"""
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        small = NewTopic(
            name=topic_prefix + "meeting-ended",
            num_partitions=1,
            replication_factor=1,
            topic_configs={"max.message.bytes": "200"},
        )
        await admin.create_topics([small])
    finally:
        await admin.close()
    await probe_topics(KAFKA, topic_prefix)  # the others; the small one is left as it is
    pool = await probe_pool(database_url)
    producer = await started_producer(KAFKA)
    relay = OutboxRelay(pool, producer, schema="probe", topic_prefix=topic_prefix)
    try:
        refused = meeting_ended(participants=2, intervals=3)
        assert 200 < len(encode_event(refused)) < 16_384  # under the producer's limits
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, refused)
        with pytest.raises(MessageSizeTooLargeError):
            await relay.publish_pending()
        row = await pool.fetchrow(
            "SELECT published_at, parked_at FROM outbox WHERE event_id = $1", refused.event_id
        )
        assert row is not None
        assert (row["published_at"], row["parked_at"]) == (None, None)
    finally:
        await producer.stop()
        await pool.close()

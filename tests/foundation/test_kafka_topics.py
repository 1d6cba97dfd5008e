"""Topic setup against the real broker: created, refused, raced, and led before it returns."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from libs.common.events import Envelope, Topic
from libs.common.kafka import ConsumerRunner
from libs.common.kafka_topics import TopicSetupError, _unready, ensure_topics
from tests.conftest import KAFKA, wait_for
from tests.support.probe import (
    effects_count,
    patient_joined,
    probe_pool,
    probe_topics,
    publish,
    record_effect,
    started_producer,
)

if TYPE_CHECKING:
    from libs.common.db import Connection


async def _described(names: list[str]) -> list[dict[str, object]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        return list(await admin.describe_topics(names))
    finally:
        await admin.close()


async def test_new_topics_have_a_leader_for_every_partition_on_return(topic_prefix: str) -> None:
    """ensure_topics returns only once every partition of every new topic is led."""
    names = [f"{topic_prefix}lobby-{i}" for i in range(6)]
    await ensure_topics(KAFKA, names, 3)
    described = await _described(names)
    assert sorted(t["topic"] for t in described) == names  # type: ignore[type-var]
    assert _unready(described) == []
    assert all(len(t["partitions"]) == 3 for t in described)  # type: ignore[arg-type]


async def test_services_creating_one_catalogue_at_once_all_start(topic_prefix: str) -> None:
    """Four callers creating the same topics at the same moment all succeed."""
    names = [f"{topic_prefix}appointment-{i}" for i in range(8)]
    await asyncio.gather(*(ensure_topics(KAFKA, names, 3) for _ in range(4)))
    assert _unready(await _described(names)) == []


async def test_a_topic_the_broker_refuses_is_an_error_not_silence(topic_prefix: str) -> None:
    """A refused topic (three replicas on one broker) raises, naming the topic."""
    name = f"{topic_prefix}meeting-ended"
    with pytest.raises(TopicSetupError, match="meeting-ended"):
        await ensure_topics(KAFKA, [name], 1, replication_factor=3, ready_timeout_s=5)


def test_a_partition_without_a_leader_is_not_ready() -> None:
    """Missing topics and leaderless partitions are unready; a follower error is not."""
    described = [
        {"topic": "a", "error_code": 0, "partitions": [{"error_code": 0, "leader": 1}]},
        {"topic": "b", "error_code": 0, "partitions": [{"error_code": 5, "leader": -1}]},
        {"topic": "c", "error_code": 3, "partitions": []},
        {"topic": "d", "error_code": 0, "partitions": [{"error_code": 9, "leader": 2}]},
    ]
    assert _unready(described) == ["b", "c"]


async def test_a_topic_created_after_the_consumer_started_is_consumed(
    topic_prefix: str, database_url: str
) -> None:
    """A consumer that subscribed before its topic existed consumes it once it does."""
    handled = asyncio.Event()

    async def record(conn: Connection, event: Envelope[Any]) -> None:
        await record_effect(conn, event)
        handled.set()

    pool = await probe_pool(database_url)
    producer = await started_producer(KAFKA)
    runner = ConsumerRunner(
        name=topic_prefix + "late-topic",
        handlers={Topic.PATIENT_JOINED: record},
        pool=pool,
        producer=producer,
        bootstrap_servers=KAFKA,
        topic_prefix=topic_prefix,
        max_poll_interval_ms=30_000,
        topics_wait_s=0,
    )
    try:
        await runner.start()
        await probe_topics(KAFKA, topic_prefix)
        await publish(producer, topic_prefix, patient_joined())
        # Within one metadata refresh (30 s) and a rebalance.
        await wait_for(handled, "the event on the late topic", within_s=60)
        assert await effects_count(pool) == 1
    finally:
        await runner.stop()
        await producer.stop()
        await pool.close()

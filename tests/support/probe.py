"""A probe consumer for the messaging tests: its effect is one row per applied event."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from aiokafka import AIOKafkaProducer

from libs.common.db import create_pool, migrate
from libs.common.events import Envelope, PatientJoinedV1, Topic, encode_event, make_event
from libs.common.kafka import (
    BatchHandler,
    ConsumerRunner,
    EventHandler,
    create_producer,
)
from libs.common.kafka_topics import ensure_topics, topics_with_dead_letters

if TYPE_CHECKING:
    from libs.common.db import Connection

PROBE_SCHEMA = "probe"
PROBE_MIGRATIONS = Path(__file__).parent / "probe_migrations"


async def record_effect(conn: Connection, event: Envelope[Any]) -> None:
    await conn.execute(
        "INSERT INTO effects (event_id, appointment_key) VALUES ($1, $2)", event.event_id, event.key
    )


async def probe_pool(dsn: str) -> asyncpg.Pool:
    pool = await create_pool(dsn, PROBE_SCHEMA)
    await migrate(pool, PROBE_SCHEMA, PROBE_MIGRATIONS)
    return pool


async def probe_topics(bootstrap: str, prefix: str) -> None:
    await ensure_topics(bootstrap, topics_with_dead_letters(prefix + t for t in Topic), 3)


def patient_joined(key: str = "apt_probe") -> Envelope[Any]:
    payload = PatientJoinedV1(
        participant=f"p-{uuid.uuid4().hex[:8]}", lobby_entered_at=datetime.now(UTC)
    )
    return make_event(Topic.PATIENT_JOINED, "tenant-probe", key, payload)


async def publish_raw(producer: AIOKafkaProducer, topic: str, value: bytes, key: str) -> None:
    await producer.send_and_wait(topic, value=value, key=key.encode())


async def publish(producer: AIOKafkaProducer, prefix: str, event: Envelope[Any]) -> None:
    await publish_raw(producer, prefix + event.type, encode_event(event), event.key)


def probe_runner(
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    bootstrap: str,
    prefix: str,
    group: str,
    runner_class: type[ConsumerRunner] = ConsumerRunner,
    handler: EventHandler = record_effect,
    batch_handler: BatchHandler | None = None,
) -> ConsumerRunner:
    """A runner of `handler` (by default: record the effect) on the probe's patient-joined."""
    return runner_class(
        name=prefix + group,
        handlers={Topic.PATIENT_JOINED: handler},
        pool=pool,
        producer=producer,
        bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        batch_size=50,
        max_poll_interval_ms=30_000,
        batch_handler=batch_handler,
    )


async def started_producer(bootstrap: str) -> AIOKafkaProducer:
    producer = create_producer(bootstrap)
    await producer.start()
    return producer


async def effects_count(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM effects"))


@contextlib.asynccontextmanager
async def probe_kit(
    bootstrap: str, database_url: str, prefix: str
) -> AsyncIterator[tuple[asyncpg.Pool, AIOKafkaProducer]]:
    """The probe topics, a pool on the probe schema and a started producer, closed after."""
    await probe_topics(bootstrap, prefix)
    pool = await probe_pool(database_url)
    producer = await started_producer(bootstrap)
    try:
        yield pool, producer
    finally:
        await producer.stop()
        await pool.close()

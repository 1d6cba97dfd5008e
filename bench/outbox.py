"""Outbox relay throughput (read rows, publish, mark) against the same producer sending the
same payloads straight to Kafka: what the transactional outbox costs."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

from bench.harness import Result, rate
from libs.common.db import create_pool, migrate
from libs.common.events import PatientJoinedV1, Topic, encode_event, make_event
from libs.common.kafka import create_producer
from libs.common.kafka_topics import ensure_topics
from libs.common.outbox import OutboxRelay, enqueue
from services.launch.app import MIGRATIONS

PG_ADMIN_DSN = os.environ.get("PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:15432/postgres")
KAFKA = os.environ.get("EHR_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")


async def run(smoke: bool) -> Result:
    count = 500 if smoke else 20_000
    name = f"bench_{uuid.uuid4().hex[:8]}"
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    pool = await create_pool(dsn, "launch", max_size=4)
    producer = create_producer(KAFKA)
    try:
        await migrate(pool, "launch", MIGRATIONS)
        await ensure_topics(KAFKA, [prefix + Topic.PATIENT_JOINED], 3)
        await producer.start()
        events = [
            make_event(
                Topic.PATIENT_JOINED,
                "tenant-bench",
                f"apt_{i % 500}",
                PatientJoinedV1(participant=f"p{i}", lobby_entered_at=datetime.now(UTC)),
            )
            for i in range(count)
        ]
        async with pool.acquire() as conn, conn.transaction():
            for event in events:
                await enqueue(conn, event)

        started = time.perf_counter()
        futures = [
            await producer.send(prefix + e.type, encode_event(e), key=e.key.encode())
            for e in events
        ]
        await asyncio.gather(*futures)
        raw_s = time.perf_counter() - started

        relay = OutboxRelay(pool, producer, schema="launch", topic_prefix=prefix, batch_size=500)
        started = time.perf_counter()
        published = 0
        while published < count:
            published += await relay.publish_pending()
        relay_s = time.perf_counter() - started
    finally:
        await producer.stop()
        await pool.close()
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        kafka_admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
        await kafka_admin.start()
        try:
            await kafka_admin.delete_topics([prefix + Topic.PATIENT_JOINED])
        finally:
            await kafka_admin.close()
    figure, baseline = rate(count, relay_s), rate(count, raw_s)
    ratio = figure / baseline
    return Result(
        name="outbox relay publish",
        figure=figure,
        unit="ev/s",
        baseline=baseline,
        ratio=ratio,
        goal=">= 0.3x raw send",
        meets_goal=ratio >= 0.3,
    )

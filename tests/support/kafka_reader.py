"""Reads what really went over a topic, for assertions."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from tests.conftest import KAFKA


async def read_all(topic: str, expect: int, within_s: float = 10.0) -> list[bytes]:
    """The values on a topic; see read_all_records."""
    return [record.value for record in await read_all_records(topic, expect, within_s)]


async def read_all_records(topic: str, expect: int, within_s: float = 10.0) -> list[ConsumerRecord]:
    """Reads a topic from the start until `expect` messages arrived, plus a short grace
    read that would catch any extra (duplicate) message."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=KAFKA,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=f"reader-{uuid.uuid4().hex}",
    )
    await consumer.start()
    values: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(within_s):
            while len(values) < expect:
                batch = await consumer.getmany(timeout_ms=200)
                values += [r for records in batch.values() for r in records]
        batch = await consumer.getmany(timeout_ms=500)
        values += [r for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    return values

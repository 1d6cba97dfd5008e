"""The faults of issue 10, injected into the running system, and the Kafka reads the checks need.

Every fault goes through the same scripts operators use (infra/kafka.sh, infra/postgres.sh) or
plain signals to the service processes `infra.run.running_system` started.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra.run import RunningSystem
from libs.common.events import Topic, UndeliverableEvent, dead_letter_topic, decode_event

ROOT = Path(__file__).resolve().parents[2]
KAFKA = os.environ.get("EHR_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")

# Who consumes what (services/*/app.py, notify/consumers.py:handlers, analytics/facts.py);
# the group name is the topic prefix plus the service name.
CONSUMERS: dict[str, tuple[str, ...]] = {
    Topic.APPOINTMENT_CREATED: ("notify", "analytics"),
    Topic.APPOINTMENT_RESCHEDULED: ("notify", "analytics"),
    Topic.APPOINTMENT_CANCELLED: ("notify", "analytics"),
    Topic.SMS_REQUESTED: ("notify",),
    Topic.INTEGRATION_CONFIG: ("launch", "notify"),
    Topic.PATIENT_JOINED: ("analytics",),
    Topic.PARTICIPANT_ADMITTED: ("analytics",),
    Topic.PARTICIPANT_LEFT: ("analytics",),
    Topic.MEETING_ENDED: ("analytics",),
    Topic.SMS_SENT: ("analytics",),
    Topic.TENANT_SETTINGS: ("analytics",),
}
SERVICES = ("launch", "config", "notify", "analytics")


@dataclass
class Poison:
    topic: str
    value: bytes
    reason: str  # what the dead-letter reason header must start with


@dataclass
class FaultLog:
    injected: list[str] = field(default_factory=list)
    poison: list[Poison] = field(default_factory=list)
    replayed: dict[str, int] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.injected.append(text)
        print(f"faults: {text}", flush=True)


def _script(*args: str) -> None:
    subprocess.run([str(ROOT / "infra" / args[0]), *args[1:]], check=True, cwd=ROOT)


def _output(*args: str) -> str:
    command = [str(ROOT / "infra" / args[0]), *args[1:]]
    return subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True).stdout


async def kill_kafka(log: FaultLog, down_s: float = 10.0) -> None:
    pid = int(await asyncio.to_thread(_output, "kafka.sh", "pid"))
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    await asyncio.sleep(down_s)  # the outage itself, as the issue prescribes
    await asyncio.to_thread(_script, "kafka.sh", "start")
    restarted = time.monotonic() - started
    await broker_serving()
    log.note(
        f"kafka broker SIGKILLed, start issued after {down_s:.0f} s, port open after"
        f" {restarted:.1f} s, serving metadata after {time.monotonic() - started:.1f} s"
    )


async def broker_serving(within_s: float = 120) -> None:
    """The port opens before a broker recovering from SIGKILL answers metadata; polls it."""
    deadline = time.monotonic() + within_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA, request_timeout_ms=5000)
        try:
            await admin.start()
            if await admin.describe_cluster():
                return
        except KafkaError:
            if time.monotonic() > deadline:
                raise
        finally:
            await admin.close()
        await asyncio.sleep(0.5)


async def restart_postgres(log: FaultLog) -> None:
    started = time.monotonic()
    await asyncio.to_thread(_script, "postgres.sh", "restart")
    log.note(f"postgres restarted (fast shutdown, start) in {time.monotonic() - started:.1f} s")


async def kill_service(system: RunningSystem, name: str, log: FaultLog) -> None:
    child = system.child(name)
    child.send_signal(signal.SIGKILL)
    started = time.monotonic()
    await system.restart(name)
    log.note(f"{name} SIGKILLed under load, healthy again in {time.monotonic() - started:.1f} s")


def poison_messages(prefix: str) -> list[Poison]:
    result = []
    for topic in CONSUMERS:
        unknown_version = orjson.dumps(
            {
                "event_id": "00000000-0000-4000-8000-000000000099",
                "type": str(topic),
                "version": 99,
                "occurred_at": "2030-01-01T00:00:00Z",
                "tenant_id": "poison",
                "key": "poison",
                "payload": {},
            }
        )
        result += [
            Poison(prefix + topic, b'{"event_id": "x", "type": "' + topic.encode(), "malformed"),
            Poison(prefix + topic, unknown_version, "unknown event type or version"),
        ]
    return result


async def inject_poison(prefix: str, log: FaultLog) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all")
    await producer.start()
    try:
        for poison in poison_messages(prefix):
            # Compacted topics refuse keyless records; a key is what any producer sends.
            await producer.send_and_wait(poison.topic, value=poison.value, key=b"poison")
            log.poison.append(poison)
    finally:
        await producer.stop()
    log.note(f"{len(log.poison)} poison messages (malformed JSON, unknown version) on every topic")


async def read_topic(topic: str) -> list[ConsumerRecord]:
    """Every record on a topic right now, from offset 0 to its end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord] = []
        async with asyncio.timeout(120):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                batch = await consumer.getmany(timeout_ms=500, max_records=2000)
                for tp, items in batch.items():
                    records += [r for r in items if r.offset < ends[tp]]
        return records
    finally:
        await consumer.stop()


def valid_event_ids(records: Iterable[ConsumerRecord]) -> set[str]:
    ids = set()
    for record in records:
        try:
            ids.add(str(decode_event(record.value).event_id))
        except UndeliverableEvent:
            continue
    return ids


async def replay_topics(prefix: str, log: FaultLog) -> int:
    """Every valid event on every consumed topic, produced again: the duplicates a producer
    retry, a relay crash after send, or an operator's offset reset would cause."""
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", linger_ms=5)
    await producer.start()
    deliveries = 0
    try:
        for topic in CONSUMERS:
            records = await read_topic(prefix + topic)
            valid = [r for r in records if valid_event_ids([r])]
            sends = [
                await producer.send(prefix + topic, value=r.value, key=r.key, headers=r.headers)
                for r in valid
            ]
            await asyncio.gather(*sends)
            log.replayed[topic] = len(valid)
            deliveries += len(valid) * len(CONSUMERS[topic])
    finally:
        await producer.stop()
    log.note(
        f"replayed {sum(log.replayed.values())} events from offset 0 on {len(CONSUMERS)} topics"
        f" ({deliveries} duplicate deliveries to consumers)"
    )
    return deliveries


def dead_letter_of(topic: str) -> str:
    return dead_letter_topic(topic)

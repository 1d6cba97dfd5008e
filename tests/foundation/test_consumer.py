from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient

from libs.common.events import Envelope, encode_event
from libs.common.kafka import ConsumerRunner
from libs.common.metrics import CONSUMER_LAG
from tests.conftest import KAFKA, wait_for
from tests.support.kafka_reader import read_all_records
from tests.support.probe import (
    effects_count,
    patient_joined,
    probe_kit,
    probe_runner,
    publish,
    publish_raw,
    record_effect,
)

Outcome = tuple[str, str, bool]


class Outcomes:
    """Collects what a runner applied; tests await a count instead of sleeping."""

    def __init__(self, runner: ConsumerRunner) -> None:
        self.seen: list[Outcome] = []
        self._targets: list[tuple[int, asyncio.Event]] = []
        runner.observe(self._on_batch)

    def _on_batch(self, outcomes: list[Outcome]) -> None:
        self.seen += outcomes
        for count, event in self._targets:
            if len(self.seen) >= count:
                event.set()

    async def reach(self, count: int, within_s: float = 20.0) -> list[Outcome]:
        event = asyncio.Event()
        self._targets.append((count, event))
        if len(self.seen) >= count:
            event.set()
        await wait_for(event, f"{count} handled events", within_s=within_s)
        return self.seen


@pytest.fixture
async def kit(
    database_url: str, topic_prefix: str
) -> AsyncIterator[tuple[asyncpg.Pool, AIOKafkaProducer]]:
    async with probe_kit(KAFKA, database_url, topic_prefix) as kit:
        yield kit


async def test_same_event_delivered_twice_is_applied_once(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """A redelivered event (same event_id) is absorbed by the inbox: one effect."""
    pool, producer = kit
    event = patient_joined()
    await publish(producer, topic_prefix, event)
    await publish(producer, topic_prefix, event)
    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "redelivery")
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        seen = await outcomes.reach(2)
    finally:
        await runner.stop()
    assert [applied for _, _, applied in seen] == [True, False]
    assert await effects_count(pool) == 1


async def test_consumer_killed_between_processing_and_commit_applies_once(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str, database_url: str
) -> None:
    """SIGKILL after the effect committed but before the offset did: the restarted consumer
    gets the event again and the inbox keeps the effect single."""
    pool, producer = kit
    group = "crash-restart"
    event = patient_joined()
    await publish(producer, topic_prefix, event)

    crashing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.crash_consumer",
        database_url,
        KAFKA,
        topic_prefix,
        group,
    )
    assert await asyncio.wait_for(crashing.wait(), 60) == -9
    assert await effects_count(pool) == 1
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(topic_prefix + group)
    finally:
        await admin.close()
    assert all(meta.offset <= 0 for meta in committed.values()), "offset must not be committed"

    runner = probe_runner(pool, producer, KAFKA, topic_prefix, group)
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        # The killed member never left the group: its partitions are reassigned only after
        # its 10 s session timeout, which takes half of the default wait by itself.
        seen = await outcomes.reach(1, within_s=60)
    finally:
        await runner.stop()
    assert seen == [("patient-joined", str(event.event_id), False)]
    assert await effects_count(pool) == 1


async def first_poll_after_restart(
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    group: str,
    event: Envelope[Any],
) -> list[tuple[str, str, bool]]:
    """Publishes `event`, starts a new runner of `group` and returns what it applies first."""
    await publish(producer, topic_prefix, event)
    runner = probe_runner(pool, producer, KAFKA, topic_prefix, group)
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        return await outcomes.reach(1)
    finally:
        await runner.stop()


async def test_committed_offsets_survive_a_restart(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """After a clean stop the next runner of the group starts after what was committed."""
    pool, producer = kit
    first, second = patient_joined(), patient_joined()
    await publish(producer, topic_prefix, first)
    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "restart")
    outcomes = Outcomes(runner)
    await runner.start()
    await outcomes.reach(1)
    await runner.stop()

    seen = await first_poll_after_restart(pool, producer, topic_prefix, "restart", second)
    assert seen == [("patient-joined", str(second.event_id), True)]
    assert await effects_count(pool) == 2


async def test_an_offset_of_a_partition_no_longer_assigned_does_not_block_commits(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """An offset left waiting for a partition that moved away (its revoke commit failed) is
    dropped, and the offsets of the partitions still assigned commit; a restart resumes after
    them."""
    pool, producer = kit
    first, second = patient_joined(), patient_joined()
    await publish(producer, topic_prefix, first)
    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "moved-away")
    outcomes = Outcomes(runner)
    await runner.start()
    await outcomes.reach(1)
    moved = TopicPartition(topic_prefix + "patient-joined", 999)
    async with runner.processing:
        runner._pending[moved] = 7  # the state a failed revoke commit leaves
        await runner.commit()
        assert moved not in runner._pending
    await runner.stop()

    seen = await first_poll_after_restart(pool, producer, topic_prefix, "moved-away", second)
    assert seen == [("patient-joined", str(second.event_id), True)]


async def test_poison_messages_go_to_the_dead_letter_topic_with_a_reason(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """Malformed JSON, an unknown version and an invalid payload are parked, not dropped,
    and do not stop the good event behind them."""
    pool, producer = kit
    topic = topic_prefix + "patient-joined"
    good = patient_joined()
    unknown_version = orjson.loads(encode_event(patient_joined()))
    unknown_version["version"] = 7
    invalid_payload = orjson.loads(encode_event(patient_joined()))
    invalid_payload["payload"]["lobby_entered_at"] = "yesterday"
    for raw in [b"{oops", orjson.dumps(unknown_version), orjson.dumps(invalid_payload)]:
        await publish_raw(producer, topic, raw, "apt_probe")
    await publish(producer, topic_prefix, good)

    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "poison")
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        seen = await outcomes.reach(1)
    finally:
        await runner.stop()
    assert seen == [("patient-joined", str(good.event_id), True)]

    parked = await read_all_records(topic + ".dlq", expect=3)
    reasons = sorted(dict(r.headers)["reason"].decode() for r in parked)
    assert reasons[0].startswith("invalid patient-joined v1: payload.lobby_entered_at")
    assert reasons[1].startswith("malformed JSON")
    assert reasons[2].startswith("unknown event type or version")
    assert {dict(r.headers)["consumer"].decode() for r in parked} == {topic_prefix + "poison"}
    assert parked[0].value == b"{oops"


async def test_a_dead_letter_copy_carries_no_field_ciphertext(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """The dead-letter copy of a JSON event has its `*_encrypted` fields blanked (named in a
    header), the rest unchanged; a message that is not JSON is parked byte for byte."""
    pool, producer = kit
    topic = topic_prefix + "patient-joined"
    ciphertext = "v1:k1:" + "A" * 40
    # A producer one release ahead added fields without a version bump: undeliverable here.
    document = orjson.loads(encode_event(patient_joined("apt_secret")))
    document["payload"]["patient_phone_encrypted"] = ciphertext
    document["payload"]["contacts"] = [{"email_encrypted": ciphertext, "kind": "home"}]
    await publish_raw(producer, topic, orjson.dumps(document), "apt_secret")
    await publish_raw(producer, topic, b"not json " + ciphertext.encode(), "apt_secret")
    good = patient_joined()
    await publish(producer, topic_prefix, good)

    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "ciphertext")
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        await outcomes.reach(1)
    finally:
        await runner.stop()

    scrubbed, verbatim = await read_all_records(topic + ".dlq", expect=2)
    assert ciphertext.encode() not in scrubbed.value
    document["payload"]["patient_phone_encrypted"] = None
    document["payload"]["contacts"][0]["email_encrypted"] = None
    assert orjson.loads(scrubbed.value) == document
    headers = dict(scrubbed.headers)
    assert headers["ciphertext-removed"] == (
        b"payload.contacts[0].email_encrypted,payload.patient_phone_encrypted"
    )
    assert headers["reason"].startswith(b"invalid patient-joined v1")
    assert verbatim.value == b"not json " + ciphertext.encode()
    assert "ciphertext-removed" not in dict(verbatim.headers)


async def test_failing_handler_retries_then_dead_letters_without_a_partial_effect(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """A handler that keeps failing is retried, then dead-lettered; its transaction,
    inbox row included, rolls back each time."""
    pool, producer = kit
    attempts = 0

    async def broken(conn: Any, event: Any) -> None:
        nonlocal attempts
        attempts += 1
        await conn.execute(
            "INSERT INTO effects (event_id, appointment_key) VALUES ($1, 'x')", event.event_id
        )
        raise ValueError("bug in handler")

    event = patient_joined()
    await publish(producer, topic_prefix, event)
    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "broken", handler=broken)
    await runner.start()
    try:
        parked = await read_all_records(topic_prefix + "patient-joined.dlq", expect=1, within_s=30)
    finally:
        await runner.stop()
    assert attempts == 5
    assert dict(parked[0].headers)["reason"] == b"handler failed 5 times: ValueError"
    assert await effects_count(pool) == 0
    assert await pool.fetchval("SELECT count(*) FROM inbox") == 0


async def test_transient_failure_is_retried_until_it_succeeds(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """A connection error in the handler retries the same event, which is applied once."""
    pool, producer = kit
    failures = 2

    async def flaky(conn: Any, event: Any) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionResetError("database went away")
        await record_effect(conn, event)

    event = patient_joined()
    await publish(producer, topic_prefix, event)
    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "flaky", handler=flaky)
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        seen = await outcomes.reach(1)
    finally:
        await runner.stop()
    assert seen == [("patient-joined", str(event.event_id), True)]
    assert await effects_count(pool) == 1
    assert uuid.UUID(seen[0][1]) == event.event_id


async def test_a_poll_is_applied_in_one_transaction_and_a_failure_falls_back_per_event(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """A poll of several events commits in one transaction; a handler failing mid-poll rolls
    the whole poll back, which is then applied one event per transaction: every effect once."""
    pool, producer = kit
    events = [patient_joined() for _ in range(6)]
    failing = events[3].event_id
    failed_once = False
    transactions: dict[uuid.UUID, int] = {}

    async def handler(conn: Any, event: Any) -> None:
        nonlocal failed_once
        await record_effect(conn, event)
        if event.event_id == failing and not failed_once:
            failed_once = True
            raise ValueError("fails once")
        transactions[event.event_id] = await conn.fetchval("SELECT txid_current()")

    for event in events:
        await publish(producer, topic_prefix, event)
    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "batched", handler=handler)
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        seen = await outcomes.reach(len(events))
    finally:
        await runner.stop()
    assert failed_once
    assert sorted(e for _, e, _ in seen) == sorted(str(e.event_id) for e in events)
    assert all(applied for _, _, applied in seen)
    assert await effects_count(pool) == len(events)
    assert await pool.fetchval("SELECT count(*) FROM inbox") == len(events)
    # The retry after the failure went one transaction per event.
    assert list(transactions.values()).count(transactions[failing]) == 1


async def test_a_poll_without_failures_shares_one_transaction(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """Events fetched in one poll are applied in a single transaction, each once."""
    pool, producer = kit
    events = [patient_joined() for _ in range(6)]
    transactions: list[int] = []

    async def handler(conn: Any, event: Any) -> None:
        await record_effect(conn, event)
        transactions.append(await conn.fetchval("SELECT txid_current()"))

    for event in events:
        await publish(producer, topic_prefix, event)
    await publish(producer, topic_prefix, events[0])  # a duplicate inside the same poll
    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "one-transaction", handler=handler)
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        seen = await outcomes.reach(len(events) + 1)
    finally:
        await runner.stop()
    assert [applied for _, _, applied in seen].count(False) == 1
    assert await effects_count(pool) == len(events)
    # All were published before the runner started, so the first poll holds most of them.
    assert len(set(transactions)) < len(transactions)


class ParallelRunner(ConsumerRunner):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs, parallel_partitions=3)


async def test_parallel_partitions_apply_side_by_side_in_order_and_once(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """With parallel partitions, a poll's partitions commit in concurrent transactions; each
    key's events still apply in order, a failure falls back per event, every effect once."""
    pool, producer = kit
    keys = [f"apt_parallel_{i}" for i in range(12)]
    events = [patient_joined(key) for _ in range(3) for key in keys]
    failing = events[-1].event_id
    failed_once = False
    open_transactions: set[int] = set()
    two_open = asyncio.Event()
    overlapped = False

    async def handler(conn: Any, event: Any) -> None:
        nonlocal failed_once, overlapped
        # clock_timestamp(), not now(): the committed rows then tell the order of application.
        await conn.execute(
            "INSERT INTO effects (event_id, appointment_key, applied_at)"
            " VALUES ($1, $2, clock_timestamp())",
            event.event_id,
            event.key,
        )
        if event.event_id == failing and not failed_once:
            failed_once = True
            raise ValueError("fails once")
        open_transactions.add(await conn.fetchval("SELECT txid_current()"))
        if len(open_transactions) >= 2:
            two_open.set()
        if not two_open.is_set():
            # Sequential partitions would wait here in vain, then carry on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await two_open.wait()
                    overlapped = True

    for event in events:
        await publish(producer, topic_prefix, event)
    runner = probe_runner(
        pool, producer, KAFKA, topic_prefix, "parallel", ParallelRunner, handler=handler
    )
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        seen = await outcomes.reach(len(events))
    finally:
        await runner.stop()
    assert failed_once
    assert overlapped
    assert all(ok for _, _, ok in seen)
    assert await effects_count(pool) == len(events)
    rows = await pool.fetch("SELECT appointment_key, event_id FROM effects ORDER BY applied_at")
    for key in keys:
        published = [e.event_id for e in events if e.key == key]
        assert [r["event_id"] for r in rows if r["appointment_key"] == key] == published, key


async def test_a_batch_handler_gets_each_first_delivery_once_and_falls_back_per_event(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """A batch handler receives a poll's first deliveries in one call (a duplicate in the poll
    left out); when it fails, the poll is applied one event at a time: every effect once."""
    pool, producer = kit
    events = [patient_joined(f"apt_batch_{i}") for i in range(8)]
    calls: list[list[uuid.UUID]] = []

    async def batch_handler(conn: Any, batch: list[Any]) -> None:
        calls.append([e.event_id for e in batch])
        await conn.execute(
            "INSERT INTO effects (event_id, appointment_key) SELECT * FROM unnest($1::uuid[],"
            " $2::text[])",
            [e.event_id for e in batch],
            [e.key for e in batch],
        )
        if len(calls) == 1:
            raise ValueError("the first poll fails once")

    for event in events:
        await publish(producer, topic_prefix, event)
    await publish(producer, topic_prefix, events[0])  # a duplicate inside the same poll
    runner = probe_runner(
        pool, producer, KAFKA, topic_prefix, "batch-handler", batch_handler=batch_handler
    )
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        seen = await outcomes.reach(len(events) + 1)
    finally:
        await runner.stop()
    phase_one = len(calls)
    # Redeliveries and new events, waiting together for the restarted consumer's first poll.
    more = [patient_joined(f"apt_batch_more_{i}") for i in range(4)]
    for event in [*events[:3], *more]:
        await publish(producer, topic_prefix, event)
    runner = probe_runner(
        pool, producer, KAFKA, topic_prefix, "batch-handler", batch_handler=batch_handler
    )
    outcomes = Outcomes(runner)
    await runner.start()
    try:
        seen += await outcomes.reach(7)
    finally:
        await runner.stop()
    assert len(calls[0]) > 1
    assert len(calls[0]) == len(set(calls[0]))
    assert [applied for _, _, applied in seen].count(True) == len(events) + len(more)
    assert await effects_count(pool) == len(events) + len(more)
    assert await pool.fetchval("SELECT count(*) FROM inbox") == len(events) + len(more)
    # After the first poll's fallback, later polls went through the batch handler again,
    # with the redelivered events left out.
    later = [i for call in calls[phase_one:] for i in call]
    assert set(later) <= {e.event_id for e in more}
    assert later


def _exported_lag(consumer: str) -> dict[str, float]:
    """The kafka_consumer_lag_messages samples of one consumer, by partition."""
    return {
        sample.labels["partition"]: sample.value
        for metric in CONSUMER_LAG.collect()
        for sample in metric.samples
        if sample.labels["consumer"] == consumer
    }


async def test_lag_is_no_longer_exported_for_partitions_that_moved_to_another_member(
    kit: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """A member exports lag only for partitions it holds: after a rebalance hands some to a
    new member, and after it stops, their last figures are gone (the alert sums members)."""
    pool, producer = kit
    events = [patient_joined(f"apt_lag_{i}") for i in range(30)]
    for event in events:
        await publish(producer, topic_prefix, event)
    runner = probe_runner(pool, producer, KAFKA, topic_prefix, "lag-gauge")
    outcomes = Outcomes(runner)
    await runner.start()
    newcomer = AIOKafkaConsumer(bootstrap_servers=KAFKA, group_id=runner.name)
    try:
        await outcomes.reach(len(events))
        assert set(_exported_lag(runner.name)) == {"0", "1", "2"}

        handed_over = asyncio.Event()
        taken: list[TopicPartition] = []

        class Joined(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                pass

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                taken[:] = assigned
                if assigned:
                    handed_over.set()

        await newcomer.start()
        newcomer.subscribe([topic_prefix + "patient-joined"], listener=Joined())
        fetching = asyncio.create_task(newcomer.getmany(timeout_ms=60_000))
        await wait_for(handed_over, "the newcomer to be assigned partitions")
        # One more record on a partition the runner kept: once it is applied, the runner's
        # side of the rebalance is over too.
        kept_one = min({0, 1, 2} - {tp.partition for tp in taken})
        after = patient_joined("apt_lag_after")
        await producer.send_and_wait(
            topic_prefix + after.type, encode_event(after), key=b"apt_lag_after", partition=kept_one
        )
        await outcomes.reach(len(events) + 1)
        kept = {str(tp.partition) for tp in runner._consumer.assignment()}
        assert {str(tp.partition) for tp in taken}.isdisjoint(_exported_lag(runner.name))
        assert set(_exported_lag(runner.name)) <= kept
        fetching.cancel()
    finally:
        await newcomer.stop()
        await runner.stop()
    assert _exported_lag(runner.name) == {}

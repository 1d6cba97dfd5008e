"""Kafka producer, topic setup and the consumer runner every service uses.

The runner gives at-least-once delivery; exactly-once effects come from the inbox row that
each handler's transaction writes together with its effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Histogram

from libs.common.events import Envelope, UndeliverableEvent, dead_letter_topic, decode_event
from libs.common.inbox import first_deliveries, first_delivery
from libs.common.metrics import (
    CONSUMER_LAG,
    CONSUMER_POLL_SECONDS,
    DEAD_LETTERED,
    EVENT_HANDLING_LAG,
    EVENTS_CONSUMED,
)

if TYPE_CHECKING:
    from libs.common.db import Connection

log = structlog.get_logger(__name__)

EventHandler = Callable[["Connection", Envelope[Any]], Awaitable[None]]
# Applies a poll's first deliveries, in poll order, in one transaction: set-based handlers do a
# few statements per poll where an EventHandler does a few per event.
BatchHandler = Callable[["Connection", list[Envelope[Any]]], Awaitable[None]]
# Told after each applied poll: (topic, event_id, applied) per record. Tests wait on it.
BatchObserver = Callable[[list[tuple[str, str, bool]]], None]


class PermanentEventError(Exception):
    """The handler can never apply this event; it goes to the dead-letter topic."""


# Errors that mean "the world is unavailable right now", so the same event is retried.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    KafkaError,
)
MAX_HANDLER_ATTEMPTS = 5


def create_producer(
    bootstrap_servers: str, security: Mapping[str, Any] | None = None
) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        **(security or {}),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        request_timeout_ms=15_000,
        compression_type=None,
    )


def without_ciphertext(value: bytes | None) -> tuple[bytes | None, list[str]]:
    """The value to dead-letter: a JSON object's `*_encrypted` fields (a patient's phone, an
    integration's secrets) set to null, with the paths of those blanked. The dead-letter topic
    keeps messages for 30 days, longer than the source topic and than the visit a phone is kept
    for, so its copy must not be decryptable. Anything else is parked as it came: bytes that
    are not JSON were never an event, and nobody reads a field out of them."""
    if not value:
        return value, []
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value, []
    if not isinstance(document, dict):
        return value, []
    removed: list[str] = []
    # Iterative: a hostile message may nest as deep as the parser allows.
    stack: list[tuple[object, str]] = [(document, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for name, child in node.items():
                at = f"{path}.{name}" if path else name
                if name.endswith("_encrypted") and child is not None:
                    node[name] = None
                    removed.append(at)
                else:
                    stack.append((child, at))
        elif isinstance(node, list):
            stack += [(item, f"{path}[{index}]") for index, item in enumerate(node)]
    if not removed:
        return value, []
    return orjson.dumps(document), sorted(removed)


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: ConsumerRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Wait for the batch in flight, then commit what it applied, before the partitions
        # move to another member; otherwise that member would redo it (harmless, but wasteful).
        async with self._runner.processing:
            await self._runner.commit(only=set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned", consumer=self._runner.name, count=len(assigned))
        self._runner.forget_lag(keep=set(assigned))


class ConsumerRunner:
    """Consumes topics, applies each event once through the inbox, then commits offsets."""

    def __init__(
        self,
        *,
        name: str,
        handlers: Mapping[str, EventHandler],
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        bootstrap_servers: str,
        topic_prefix: str = "",
        batch_size: int = 100,
        fetch_min_bytes: int = 1,
        fetch_max_wait_ms: int = 500,
        commit_interval_s: float = 1.0,
        max_poll_interval_ms: int = 300_000,
        handler_timeout_s: float = 30.0,
        security: Mapping[str, Any] | None = None,
        parallel_partitions: int = 1,
        batch_handler: BatchHandler | None = None,
        topics_wait_s: float = 10.0,
    ) -> None:
        self.name = name
        self._topics_wait_s = topics_wait_s
        # With a batch handler a whole poll goes through it; `handlers` remain the per-event
        # path a failed poll falls back to, and must have the same effect.
        self._batch_handler = batch_handler
        # >1: the partitions of a poll are applied in that many concurrent transactions, for
        # handlers whose rows belong to one key (then two partitions never touch one row).
        # Handlers that fold many keys into shared rows (analytics' aggregates) stay at 1:
        # concurrent transactions would queue on those rows' locks, or deadlock.
        self._partition_slots = asyncio.Semaphore(max(1, parallel_partitions))
        self._parallel = parallel_partitions > 1
        self._handlers = {topic_prefix + topic: handler for topic, handler in handlers.items()}
        self._prefix = topic_prefix
        self._pool = pool
        self._producer = producer
        self._batch_size = batch_size
        self._handler_timeout_s = min(handler_timeout_s, max_poll_interval_ms / 1000 / 4)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=name,
            client_id=name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=max_poll_interval_ms,
            fetch_min_bytes=fetch_min_bytes,
            fetch_max_wait_ms=fetch_max_wait_ms,
            isolation_level="read_committed",
            # A subscribed topic missing from metadata when the group formed (not yet
            # created by Strimzi's operator, or not yet led) is assigned at the next refresh:
            # 30 s instead of the default 5 min, for one metadata request per 30 s.
            metadata_max_age_ms=30_000,
            **(security or {}),
        )
        self._pending: dict[TopicPartition, int] = {}
        self._commit_interval_s = commit_interval_s
        self._committed_at = time.perf_counter()
        self._poll_apply = CONSUMER_POLL_SECONDS.labels(name, "apply")
        self._poll_commit = CONSUMER_POLL_SECONDS.labels(name, "commit")
        self.processing = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._attempts: dict[tuple[TopicPartition, int], int] = {}
        self._observers: list[BatchObserver] = []
        self._outcomes: list[tuple[str, str, bool]] = []
        self._counters: dict[tuple[str, str], Counter] = {}
        self._lags: dict[str, Histogram] = {}
        # Partitions this member exports a lag gauge for: a partition that moved to another
        # member (or a stopped member's) must stop being exported, or its last figure stays
        # beside the new owner's and the lag alert sums both for as long as the pod lives.
        self._lagging: set[TopicPartition] = set()

    def observe(self, observer: BatchObserver) -> None:
        self._observers.append(observer)

    async def start(self) -> None:
        await self._consumer.start()
        # A group joined before the broker's metadata lists a topic is assigned none of it
        # until the next metadata refresh (metadata_max_age_ms); wait for the topics first.
        wanted = set(self._handlers)
        deadline = time.monotonic() + self._topics_wait_s
        while missing := sorted(wanted - await self._consumer.topics()):
            if time.monotonic() >= deadline:
                log.warning(
                    "subscribing before these topics exist; they are consumed once they do",
                    consumer=self.name,
                    missing=missing,
                )
                break
            await asyncio.sleep(0.1)
        self._consumer.subscribe(topics=list(self._handlers), listener=_CommitOnRevoke(self))
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.name}")

    async def stop(self) -> None:
        """Finish the batch in flight, commit it, then leave the group."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self.processing:
            with contextlib.suppress(KafkaError, CommitFailedError):
                await self.commit()
        await self._consumer.stop()
        self.forget_lag(keep=set())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _commit_applied(self) -> None:
        try:
            await self.commit()
        except KafkaError as exc:
            log.warning("offset commit failed", consumer=self.name, error=type(exc).__name__)
        self._committed_at = time.perf_counter()

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        # A partition that moved to another member while its offset waited here (its revoke
        # commit failed) is dropped: aiokafka refuses a commit naming it, which would block
        # every later commit; its new owner redelivers from the last commit, deduped.
        assigned = self._consumer.assignment()
        for tp in [tp for tp in self._pending if tp not in assigned]:
            del self._pending[tp]
        offsets = {
            tp: OffsetAndMetadata(offset, "")
            for tp, offset in self._pending.items()
            if only is None or tp in only
        }
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except CommitFailedError:
            # The group moved on without us; the new owner redelivers and the inbox dedupes.
            log.warning("offset commit rejected after rebalance", consumer=self.name)
        for tp in offsets:
            self._pending.pop(tp, None)

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                batch = await self._consumer.getmany(timeout_ms=500, max_records=self._batch_size)
            except KafkaError as exc:
                log.warning("kafka fetch failed", consumer=self.name, error=type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not batch:
                if self._pending:  # idle: commit what the last polls applied
                    async with self.processing:
                        await self._commit_applied()
                continue
            async with self.processing:
                started = time.perf_counter()
                retry_after = await self._process_batch(batch)
                applied = time.perf_counter()
                self._poll_apply.observe(applied - started)
                # Offsets are committed at most every commit_interval_s while records keep
                # coming (and when idle, on revoke and on stop): an offset commit is a round
                # trip to the group coordinator that the next poll would otherwise wait for,
                # and what a crash leaves uncommitted is redelivered and deduped by the inbox.
                if retry_after or applied - self._committed_at >= self._commit_interval_s:
                    await self._commit_applied()
                    self._poll_commit.observe(time.perf_counter() - applied)
            self._record_lag(batch)
            outcomes, self._outcomes = self._outcomes, []
            for observer in self._observers:
                observer(outcomes)
            if retry_after:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            else:
                backoff = 0.2

    async def _process_batch(self, batch: Mapping[TopicPartition, list[ConsumerRecord]]) -> bool:
        """Apply a batch; True when some partition must retry from a record later."""
        if self._parallel and len(batch) > 1:
            # Each partition's records stay in order inside its own transaction.
            parts = list(batch.items())
            together = await asyncio.gather(
                *(self._apply_partition(tp, records) for tp, records in parts)
            )
            rest = {
                tp: records for (tp, records), done in zip(parts, together, strict=True) if not done
            }
        else:
            rest = {} if await self._apply_together(batch) else dict(batch)
        must_retry = False
        for tp, records in rest.items():
            for record in records:
                if not await self._process(tp, record):
                    # Leave the rest of this partition for later, in order.
                    self._consumer.seek(tp, record.offset)
                    must_retry = True
                    break
                self._pending[tp] = record.offset + 1
        return must_retry

    async def _apply_partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> bool:
        async with self._partition_slots:
            return await self._apply_together({tp: records})

    async def _apply_together(self, batch: Mapping[TopicPartition, list[ConsumerRecord]]) -> bool:
        """Applies a whole poll in one transaction (each event still through its inbox row) and
        returns True; or changes nothing and returns False, and the batch goes one event per
        transaction, where a poison message, a failing handler or an outage is dealt with
        record by record. One commit per poll instead of per event is most of the speed-up;
        the rollback on failure is why it is safe: nothing a handler did survives it, and
        handlers only touch the database."""
        records = [(tp, record) for tp, records in batch.items() for record in records]
        if len(records) < 2:
            return False
        decoded: list[tuple[TopicPartition, ConsumerRecord, str, Envelope[Any]]] = []
        for tp, record in records:
            base_topic = record.topic.removeprefix(self._prefix)
            try:
                decoded.append((tp, record, base_topic, decode_event(record.value, base_topic)))
            except UndeliverableEvent:
                return False
        outcomes: list[bool] = []
        committed = False
        try:
            async with asyncio.timeout(self._handler_timeout_s), self._pool.acquire() as conn:
                async with conn.transaction():
                    outcomes = await self._apply_all_on(conn, decoded)
                # Past here the poll is applied: a timeout or error while the connection goes
                # back to the pool must not send it down the per-event path, where every event
                # would be a duplicate and its bookkeeping (metrics) lost.
                committed = True
        except Exception as exc:
            if not committed:
                log.info(
                    "batch applied one event at a time instead",
                    consumer=self.name,
                    records=len(records),
                    error=type(exc).__name__,
                )
                return False
            log.warning("connection release failed after a committed poll", consumer=self.name)
        for (tp, record, base_topic, event), applied in zip(decoded, outcomes, strict=True):
            self._pending[tp] = record.offset + 1
            self._done(tp, record, base_topic, event, applied)
        return True

    async def _apply_all_on(
        self,
        conn: Connection,
        decoded: list[tuple[TopicPartition, ConsumerRecord, str, Envelope[Any]]],
    ) -> list[bool]:
        if self._batch_handler is not None:
            return await self._apply_batch_on(conn, decoded, self._batch_handler)
        outcomes = []
        for _tp, record, base_topic, event in decoded:
            with structlog.contextvars.bound_contextvars(
                event_id=str(event.event_id), topic=base_topic, appointment_key=event.key
            ):
                outcomes.append(
                    await self._apply_on(conn, event, base_topic, self._handlers[record.topic])
                )
        return outcomes

    async def _apply_batch_on(
        self,
        conn: Connection,
        decoded: list[tuple[TopicPartition, ConsumerRecord, str, Envelope[Any]]],
        handler: BatchHandler,
    ) -> list[bool]:
        """The poll's inbox rows in one statement, then its first deliveries in one call."""
        outcomes = await first_deliveries(
            conn, self.name, [(event.event_id, topic) for _, _, topic, event in decoded]
        )
        events = [d[3] for d, applied in zip(decoded, outcomes, strict=True) if applied]
        if events:
            with structlog.contextvars.bound_contextvars(events=len(events)):
                await handler(conn, events)
        return outcomes

    def _done(
        self,
        tp: TopicPartition,
        record: ConsumerRecord,
        base_topic: str,
        event: Envelope[Any],
        applied: bool,
    ) -> None:
        """The bookkeeping of a record whose transaction committed, whichever path took it."""
        self._attempts.pop((tp, record.offset), None)
        self._count(base_topic, event, applied)
        self._outcomes.append((base_topic, str(event.event_id), applied))

    def _count(self, base_topic: str, event: Envelope[Any], applied: bool) -> None:
        outcome = "applied" if applied else "duplicate"
        counter = self._counters.get((base_topic, outcome))
        if counter is None:
            # Looking a labelled child up costs more than counting; once per topic and outcome.
            counter = EVENTS_CONSUMED.labels(self.name, base_topic, outcome)
            self._counters[(base_topic, outcome)] = counter
        counter.inc()
        if applied:
            lag = self._lags.get(base_topic)
            if lag is None:
                lag = self._lags[base_topic] = EVENT_HANDLING_LAG.labels(self.name, base_topic)
            lag.observe(max(0.0, time.time() - event.occurred_at.timestamp()))

    async def _process(self, tp: TopicPartition, record: ConsumerRecord) -> bool:
        """Returns False when the record must be retried later."""
        base_topic = record.topic.removeprefix(self._prefix)
        try:
            event = decode_event(record.value, base_topic)
        except UndeliverableEvent as exc:
            await self._dead_letter(record, exc.reason)
            return True
        handler = self._handlers[record.topic]
        with structlog.contextvars.bound_contextvars(
            event_id=str(event.event_id), topic=base_topic, appointment_key=event.key
        ):
            attempt_key = (tp, record.offset)
            try:
                async with asyncio.timeout(self._handler_timeout_s):
                    applied = await self._apply(event, base_topic, handler)
            except PermanentEventError as exc:
                await self._dead_letter(record, f"handler refused: {exc}")
                return True
            except TRANSIENT_ERRORS as exc:
                EVENTS_CONSUMED.labels(self.name, base_topic, "retried").inc()
                log.warning("event will be retried", error=type(exc).__name__)
                return False
            except Exception as exc:
                attempts = self._attempts.get(attempt_key, 0) + 1
                self._attempts[attempt_key] = attempts
                log.exception("event handler failed", attempt=attempts)
                if attempts < MAX_HANDLER_ATTEMPTS:
                    EVENTS_CONSUMED.labels(self.name, base_topic, "retried").inc()
                    return False
                self._attempts.pop(attempt_key, None)
                await self._dead_letter(
                    record, f"handler failed {attempts} times: {type(exc).__name__}"
                )
                return True
            self._done(tp, record, base_topic, event, applied)
            return True

    async def _apply(self, event: Envelope[Any], topic: str, handler: EventHandler) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._apply_on(conn, event, topic, handler)

    async def _apply_on(
        self, conn: Connection, event: Envelope[Any], topic: str, handler: EventHandler
    ) -> bool:
        if not await first_delivery(conn, self.name, event.event_id, topic):
            return False
        await handler(conn, event)
        return True

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        base_topic = record.topic.removeprefix(self._prefix)
        log.error("event dead-lettered", topic=base_topic, reason=reason, offset=record.offset)
        value, removed = without_ciphertext(record.value)
        headers = [
            ("reason", reason.encode()[:1000]),
            ("consumer", self.name.encode()),
            ("source-topic", record.topic.encode()),
            ("source-partition", str(record.partition).encode()),
            ("source-offset", str(record.offset).encode()),
        ]
        if removed:
            headers.append(("ciphertext-removed", ",".join(removed).encode()[:1000]))
        # Awaited before the offset is committed: a poison message is parked, never dropped.
        await self._producer.send_and_wait(
            dead_letter_topic(record.topic), value=value, key=record.key, headers=headers
        )
        DEAD_LETTERED.labels(self.name, base_topic).inc()
        EVENTS_CONSUMED.labels(self.name, base_topic, "dead_lettered").inc()

    def _record_lag(self, batch: Mapping[TopicPartition, list[ConsumerRecord]]) -> None:
        for tp in batch:
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            position = batch[tp][-1].offset + 1
            CONSUMER_LAG.labels(*self._lag_labels(tp)).set(max(0, highwater - position))
            self._lagging.add(tp)

    def _lag_labels(self, tp: TopicPartition) -> tuple[str, str, str]:
        return self.name, tp.topic.removeprefix(self._prefix), str(tp.partition)

    def forget_lag(self, keep: set[TopicPartition]) -> None:
        """Stops exporting the lag of every partition not in `keep`."""
        for tp in self._lagging - keep:
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(*self._lag_labels(tp))
        self._lagging &= keep

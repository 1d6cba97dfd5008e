"""Analytics: ingest throughput from Kafka into facts and the daily rollup (inbox dedupe
included; baseline: asyncpg COPY of the same number of rows in the same database), and the
latency (p50 and p95 per grouping; the figure is the worst p95) of a 90-day usage report over
1,000,000 generated appointments (baseline: the same report aggregated straight from the
facts)."""

from __future__ import annotations

import asyncio
import math
import os
import random
import statistics
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from bench.harness import Benchmark, Result, rate
from libs.common.db import create_pool, migrate
from libs.common.events import (
    AppointmentCreatedV1,
    AttendanceInterval,
    Envelope,
    MeetingEndedV1,
    ParticipantAdmittedV1,
    ParticipantAttendance,
    ParticipantLeftV1,
    PatientJoinedV1,
    SmsSentV1,
    Topic,
    decode_event,
    encode_event,
    make_event,
)
from libs.common.housekeeping import Housekeeper, inbox_expiry
from libs.common.kafka import ConsumerRunner, create_producer
from libs.common.kafka_topics import ensure_topics
from libs.common.portal_auth import PORTAL_MIGRATIONS
from services.analytics import reports, rollup
from services.analytics.app import MIGRATIONS
from services.analytics.facts import FactsProjector
from services.analytics.metrics import MetricsRecorder
from services.analytics.settings import AnalyticsSettings

PG_ADMIN_DSN = os.environ.get("PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:15432/postgres")
KAFKA = os.environ.get("EHR_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
SCHEMA = "analytics"
TENANT = "tenant-bench"
DEPARTMENTS = [f"Department {i:02d}" for i in range(12)]
INTEGRATIONS = [uuid.UUID(int=i + 1) for i in range(4)]
# The service's defaults; BENCH_INGEST_BATCH_HANDLER=0 measures the per-event path.
BATCH_SIZE = int(
    os.environ.get(
        "BENCH_INGEST_BATCH_SIZE", AnalyticsSettings.model_fields["consumer_batch_size"].default
    )
)
BATCH_HANDLER = os.environ.get("BENCH_INGEST_BATCH_HANDLER", "1") == "1"


async def _database() -> tuple[str, asyncpg.Pool]:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    pool = await create_pool(
        PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name,
        SCHEMA,
        max_size=4,
        custom_plans=AnalyticsSettings.model_fields["database_custom_plans"].default,
    )
    await migrate(pool, SCHEMA, MIGRATIONS, [PORTAL_MIGRATIONS])
    # The inbox index every running service builds on its first housekeeping round: each
    # inbox insert maintains it, as in production.
    inbox = inbox_expiry(timedelta(days=45))
    assert await Housekeeper(pool, [inbox], interval_s=3600).ensure_index(inbox)
    return name, pool


async def _drop(name: str, pool: asyncpg.Pool) -> None:
    await pool.close()
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def _visit_events(rng: random.Random, start: datetime) -> list[Envelope[Any]]:
    """One visit as launch and notify publish it: booking, lobby, admissions, leaves, an
    SMS and the end-of-meeting report."""
    key = f"apt-{uuid.uuid4().hex}"
    lobby = start - timedelta(seconds=rng.randint(10, 600))
    end = start + timedelta(seconds=rng.randint(300, 3600))
    integration = rng.choice(INTEGRATIONS)

    def event(topic: Topic, payload: Any) -> Envelope[Any]:
        return make_event(topic, TENANT, key, payload)

    return [
        event(
            Topic.APPOINTMENT_CREATED,
            AppointmentCreatedV1(
                integration_id=integration,
                environment="production",
                department=rng.choice(DEPARTMENTS),
                starts_at=start,
                ends_at=start + timedelta(minutes=30),
                time_zone="UTC",
            ),
        ),
        event(Topic.PATIENT_JOINED, PatientJoinedV1(participant="pt", lobby_entered_at=lobby)),
        event(
            Topic.PARTICIPANT_ADMITTED,
            ParticipantAdmittedV1(participant="dr", role="organizer", admitted_at=start),
        ),
        event(
            Topic.PARTICIPANT_ADMITTED,
            ParticipantAdmittedV1(participant="pt", role="patient", admitted_at=start),
        ),
        event(
            Topic.SMS_SENT,
            SmsSentV1(
                integration_id=integration, kind="link", outcome="sent", segments=1, at=lobby
            ),
        ),
        event(
            Topic.PARTICIPANT_LEFT, ParticipantLeftV1(participant="pt", role="patient", left_at=end)
        ),
        event(
            Topic.MEETING_ENDED,
            MeetingEndedV1(
                meeting_started_at=start,
                meeting_ended_at=end,
                participants=[
                    ParticipantAttendance(
                        participant="dr",
                        role="organizer",
                        intervals=[AttendanceInterval(joined_at=start, left_at=end)],
                    ),
                    ParticipantAttendance(
                        participant="pt",
                        role="patient",
                        lobby_entered_at=lobby,
                        admitted_at=start,
                        intervals=[AttendanceInterval(joined_at=start, left_at=end)],
                    ),
                ],
            ),
        ),
    ]


def _after_first_poll(marks: list[tuple[float, int]], started: float) -> tuple[int, float]:
    """How many records were handled after the first poll and in how long (the group join
    and the first fetch excluded), from (time, handled so far) marks; all of them with one."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    if len(marks) == 1:
        return n1, t1 - started
    return n1 - n0, t1 - t0


async def _consume(pool: asyncpg.Pool, prefix: str, total: int) -> tuple[int, float]:
    """Runs the analytics consumer until `total` records are handled; returns how many were
    handled after the first batch and how long they took (group join excluded)."""
    producer = create_producer(KAFKA)
    await producer.start()
    projector = FactsProjector(MetricsRecorder())
    runner = ConsumerRunner(
        name=prefix + "analytics",
        handlers=projector.handlers(),
        pool=pool,
        producer=producer,
        bootstrap_servers=KAFKA,
        topic_prefix=prefix,
        batch_size=BATCH_SIZE,
        batch_handler=projector.apply if BATCH_HANDLER else None,
    )
    done = asyncio.Event()
    marks: list[tuple[float, int]] = []
    handled = 0

    def seen(outcomes: list[tuple[str, str, bool]]) -> None:
        nonlocal handled
        handled += len(outcomes)
        marks.append((time.perf_counter(), handled))
        if handled >= total:
            done.set()

    runner.observe(seen)
    started = time.perf_counter()
    await runner.start()
    try:
        async with asyncio.timeout(600):
            await done.wait()
    finally:
        await runner.stop()
        await producer.stop()
    return _after_first_poll(marks, started)


async def _fetch_and_decode(topics: list[str], total: int) -> tuple[int, float]:
    """The ceiling of a validating Python consumer on this machine: the same records fetched
    with aiokafka in polls of the service's size and decoded with the services' own
    `decode_event` (orjson and pydantic), nothing else. Counted as `_consume` counts."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=KAFKA,
        group_id=f"ceiling-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    marks: list[tuple[float, int]] = []
    decoded = 0
    started = time.perf_counter()
    try:
        async with asyncio.timeout(600):
            while decoded < total:
                polled = await consumer.getmany(timeout_ms=1000, max_records=BATCH_SIZE)
                for records in polled.values():
                    for record in records:
                        decode_event(record.value, record.topic.rsplit(".", 1)[-1])
                    decoded += len(records)
                if polled:
                    marks.append((time.perf_counter(), decoded))
    finally:
        await consumer.stop()
    return _after_first_poll(marks, started)


# The ceiling measured beside each ingest run, for the row that reports it.
_ceiling: dict[bool, Result] = {}


async def ingest(smoke: bool) -> Result:
    visits = 30 if smoke else 3000
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    name, pool = await _database()
    rng = random.Random(7)
    base = datetime(2026, 3, 1, 8, tzinfo=UTC)
    stream = [e for i in range(visits) for e in _visit_events(rng, base + timedelta(minutes=7 * i))]
    # Kafka is at least once: a tenth of the events arrive twice.
    stream += rng.sample(stream, len(stream) // 10)
    topics = [prefix + t for t in Topic]
    try:
        await ensure_topics(KAFKA, topics, 3)
        producer = create_producer(KAFKA)
        await producer.start()
        try:
            sends = [
                await producer.send(prefix + e.type, encode_event(e), key=e.key.encode())
                for e in stream
            ]
            await asyncio.gather(*sends)
        finally:
            await producer.stop()
        handled, seconds = await _consume(pool, prefix, len(stream))
        ceiling_handled, ceiling_s = await _fetch_and_decode(topics, len(stream))
        async with pool.acquire() as conn:
            problems = await rollup.check(conn, TENANT)
            counted = await conn.fetchval("SELECT sum(visits) FROM daily_usage")
        assert problems == [], problems
        assert counted == visits, counted

        rows = [(e.event_id, e.type, e.key, encode_event(e)) for e in stream]
        await pool.execute(
            "CREATE TABLE copy_baseline (event_id uuid, topic text, key text, payload bytea)"
        )
        started = time.perf_counter()
        await pool.copy_records_to_table("copy_baseline", records=rows)
        copy_s = time.perf_counter() - started
    finally:
        await _drop(name, pool)
        admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
        await admin.start()
        try:
            await admin.delete_topics(topics)
        finally:
            await admin.close()
    figure, baseline = rate(handled, seconds), rate(len(rows), copy_s)
    ratio = figure / baseline
    ceiling = rate(ceiling_handled, ceiling_s)
    _ceiling[smoke] = Result(
        name="analytics ingest ceiling: Kafka fetch + decode only",
        figure=ceiling,
        unit="ev/s",
        baseline=baseline,
        ratio=ceiling / baseline,
        # Not a goal: what any consumer that validates its events in Python starts from.
        goal="(reported)",
        meets_goal=True,
    )
    return Result(
        name="analytics ingest Kafka->facts+rollup",
        figure=figure,
        unit="ev/s",
        baseline=baseline,
        ratio=ratio,
        # Issue 9's goal. Not met: a poll is applied in six statements, but decoding and
        # recomputing each visit in Python costs more per event than COPY's whole budget.
        # See docs/performance.md.
        goal=">= 0.15x COPY",
        meets_goal=ratio >= 0.15,
    )


def _fact_rows(rng: random.Random, count: int, first_day: date, days: int) -> list[tuple[Any, ...]]:
    rows = []
    for i in range(count):
        day = first_day + timedelta(days=rng.randrange(days))
        at = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(
            seconds=rng.randrange(86_400)
        )
        completed = rng.random() < 0.85
        department = rng.randrange(len(DEPARTMENTS))
        duration = int(rng.expovariate(1 / 1_200_000)) if completed else 0
        wait = int(rng.expovariate(1 / 180_000)) if completed else None
        rows.append(
            (
                f"apt-{i:08d}",
                TENANT,
                # Each department is served by one integration, as in a real organisation.
                INTEGRATIONS[department % len(INTEGRATIONS)],
                "test" if department == 0 else "production",
                DEPARTMENTS[department],
                "completed" if completed else "no_show",
                at if completed else None,
                at,
                day,
                duration,
                wait,
                2 if completed else 1,
                rng.randrange(3),
            )
        )
    return rows


# The same 90-day report, grouped by department, straight from the facts.
_FROM_FACTS = """
SELECT department, count(*), count(*) FILTER (WHERE status = 'completed'),
    count(*) FILTER (WHERE status = 'no_show'), sum(sms_sent),
    avg(lobby_wait_ms), percentile_disc(0.5) WITHIN GROUP (ORDER BY lobby_wait_ms),
    percentile_disc(0.9) WITHIN GROUP (ORDER BY lobby_wait_ms),
    avg(duration_ms), percentile_disc(0.5) WITHIN GROUP (ORDER BY duration_ms),
    percentile_disc(0.9) WITHIN GROUP (ORDER BY duration_ms)
FROM appointment_facts
WHERE tenant_id = $1 AND status IN ('completed', 'no_show') AND report_day BETWEEN $2 AND $3
GROUP BY department
"""


async def report_latency(smoke: bool) -> Result:
    count = 20_000 if smoke else 1_000_000
    repeats = 5 if smoke else 30
    name, pool = await _database()
    rng = random.Random(11)
    last = date(2026, 6, 30)
    first = last - timedelta(days=89)
    try:
        columns = [
            "appointment_key",
            "tenant_id",
            "integration_id",
            "environment",
            "department",
            "status",
            "started_at",
            "report_at",
            "report_day",
            "duration_ms",
            "lobby_wait_ms",
            "attendees",
            "sms_sent",
        ]
        chunk = 100_000
        for offset in range(0, count, chunk):
            rows = _fact_rows(rng, min(chunk, count - offset), first - timedelta(days=30), 120)
            rows = [(f"{r[0]}-{offset}", *r[1:]) for r in rows]
            await pool.copy_records_to_table("appointment_facts", records=rows, columns=columns)
        async with pool.acquire() as conn, conn.transaction():
            await rollup.rebuild(conn, TENANT)
        await pool.execute("ANALYZE")

        groups: list[reports.GroupBy] = ["day", "department", "environment", "integration"]
        samples: dict[str, list[float]] = {g: [] for g in groups}
        for group_by in groups:  # warm the caches and the prepared statements
            await reports.usage(pool, TENANT, first, last, group_by)
        for _ in range(repeats):
            for group_by in groups:
                started = time.perf_counter()
                await reports.usage(pool, TENANT, first, last, group_by)
                samples[group_by].append((time.perf_counter() - started) * 1000)
        direct = []
        for _ in range(max(1, repeats // 10)):
            started = time.perf_counter()
            await pool.fetch(_FROM_FACTS, TENANT, first, last)
            direct.append((time.perf_counter() - started) * 1000)
        totals = await reports.usage(pool, TENANT, first, last, "department")
        assert totals.totals.appointments > count * 0.7
    finally:
        await _drop(name, pool)
    p95s = {g: p95(v) for g, v in samples.items()}
    for g, v in samples.items():
        p50 = statistics.median(v)
        print(f"  90-day report by {g:<11} p50 {p50:7.1f} ms  p95 {p95s[g]:7.1f} ms")
    worst = max(p95s.values())
    baseline = statistics.median(direct)
    return Result(
        name=f"analytics 90-day report p95 ({count:,} appts)",
        figure=worst,
        unit="ms",
        baseline=baseline,
        ratio=worst / baseline,
        goal="p95 < 100 ms",
        meets_goal=worst < 100,
    )


def p95(samples: list[float]) -> float:
    """The 95th percentile (nearest rank) of the samples."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


async def ingest_ceiling(smoke: bool) -> Result:
    """Measured by the ingest run just before (BENCHMARKS keeps that order)."""
    if smoke not in _ceiling:
        await ingest(smoke)
    return _ceiling[smoke]


BENCHMARKS = [
    Benchmark("analytics ingest Kafka->facts+rollup", ingest),
    Benchmark("analytics ingest ceiling: Kafka fetch + decode only", ingest_ceiling),
    Benchmark("analytics 90-day report over 1M appointments", report_latency),
]

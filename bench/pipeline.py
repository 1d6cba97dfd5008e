"""Event pipeline latency: a booking in the EHR to its confirmation SMS accepted by ACS.

The whole system runs as processes (`bench.system`: both stand-ins, config, launch, notify,
analytics) with its own database and topics. Appointments are booked in the EHR stand-in at
a steady rate, spread over many EHR tenants (each an integration with its own sending
number, as a group of hospitals would have; one number's 180 SMS a minute could not carry
100 bookings a second). Each booking travels: EHR signed scheduling webhook -> launch
`POST /ehr/scheduling` (meeting through Graph, appointment and outbox row in one
transaction) -> outbox relay -> Kafka `appointment-created` -> notify's consumer (the
confirmation planned) -> the SMS dispatcher -> the ACS stand-in, which records the send with
its accept time (`sentDateTime`, microseconds).

Latency per booking: the ACS accept time minus the moment the benchmark sent the booking to
the EHR (same machine, same clock). The SMS names its appointment through the join link.
Figure: p99 in ms; a booking whose SMS never arrives counts as infinitely late.
Baseline, same run, same broker, before the load: the p99 round trip of one record produced
and consumed with bare aiokafka (acks=all, idempotent producer as the services use; a
consumer already assigned and waiting), one at a time.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer

from bench.harness import Benchmark, Result
from bench.processes import backend_cpu_s, kafka_broker_pid, process_cpu_s
from bench.system import (
    APPOINTMENT_KEY_SECRET,
    KAFKA,
    BenchSystem,
    Tenant,
    bench_system,
)
from libs.common.kafka import create_producer
from libs.common.kafka_topics import ensure_topics
from libs.common.keys import appointment_key

GOAL_MS = 500.0
WARMUP_RATE = 50.0  # bookings a second before the measured run (see warm_up)
JOIN = re.compile(r"/join/([A-Za-z0-9_-]+)\.")


@dataclass
class Booking:
    tenant: Tenant
    body: dict[str, Any]
    sent_at: float = 0.0
    key: str | None = None
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; inf when empty."""
    if not values:
        return math.inf
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def kafka_round_trip(prefix: str, samples: int) -> list[float]:
    """Seconds from send to receipt, one record at a time, on a fresh topic of the run (its
    `drop_run` deletes it)."""
    topic = f"{prefix}rtt"
    await ensure_topics(KAFKA, [topic], 1)
    producer = create_producer(KAFKA)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=KAFKA, group_id=f"{topic}-group", auto_offset_reset="earliest"
    )
    await producer.start()
    await producer.partitions_for(topic)  # the new topic is in the metadata before we join
    await consumer.start()
    timings = []
    try:
        await producer.send_and_wait(topic, b"warm-up")
        await asyncio.wait_for(consumer.getone(), timeout=60)
        for i in range(samples):
            started = time.perf_counter()
            await producer.send(topic, str(i).encode())
            await asyncio.wait_for(consumer.getone(), timeout=30)
            timings.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
    finally:
        await consumer.stop()
        await producer.stop()
    return timings


async def _bookings(http: aiohttp.ClientSession, system: BenchSystem, count: int) -> list[Booking]:
    directories = {}
    for tenant in system.tenants:
        async with http.get(f"{system.urls['ehr']}/_sandbox/tenants/{tenant.guid}/directory") as r:
            directories[tenant.guid] = await r.json()
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=3)
    bookings = []
    for i in range(count):
        tenant = system.tenants[i % len(system.tenants)]
        directory = directories[tenant.guid]
        body = {
            "patient": directory["patients"][i % len(directory["patients"])]["id"],
            "practitioner": directory["practitioners"][0]["id"],
            "location": directory["locations"][i % len(directory["locations"])]["id"],
            "start": (start + timedelta(minutes=i % 480)).isoformat(),
            "minutes": 20,
            "video": True,
        }
        bookings.append(Booking(tenant, body))
    return bookings


async def _book(http: aiohttp.ClientSession, system: BenchSystem, booking: Booking) -> None:
    booking.sent_at = time.time()
    try:
        async with http.post(
            f"{system.urls['ehr']}/_sandbox/tenants/{booking.tenant.guid}/appointments",
            json=booking.body,
        ) as r:
            answer = await r.json()
            if r.status != 201:
                booking.error = f"{r.status}"
                return
    except (aiohttp.ClientError, TimeoutError) as exc:
        booking.error = type(exc).__name__
        return
    booking.key = appointment_key(
        APPOINTMENT_KEY_SECRET, booking.tenant.integration_id, str(answer["id"])
    )


def _accepted(messages: list[dict[str, Any]]) -> dict[str, float]:
    """Appointment key -> ACS accept time (epoch seconds) of its confirmation."""
    found: dict[str, float] = {}
    for message in messages:
        match = JOIN.search(message.get("message", ""))
        if match is None or message.get("direction") != "outbound":
            continue
        token = match.group(1)
        key = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["a"]
        sent = datetime.fromisoformat(message["sentDateTime"][:26] + "+00:00")
        found.setdefault(key, sent.timestamp())
    return found


async def _sent(dsn: str, wanted: int, within_s: float) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            sent = await conn.fetchval(
                "SELECT count(*) FROM notify.sms_messages"
                " WHERE kind = 'confirmation' AND status <> 'pending'"
            )
            if sent >= wanted:
                return
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def _messages(http: aiohttp.ClientSession, system: BenchSystem) -> list[dict[str, Any]]:
    async with http.get(f"{system.urls['microsoft']}/_sandbox/sms/messages") as r:
        body = await r.json()
    return list(body["value"])


STAGES = """
SELECT o.key,
       extract(epoch FROM o.created_at) AS recorded,
       extract(epoch FROM o.published_at) AS relayed,
       extract(epoch FROM i.processed_at) AS consumed,
       extract(epoch FROM m.repeatability_first_sent) AS dispatched
FROM launch.outbox o
LEFT JOIN notify.inbox i ON i.event_id = o.event_id AND i.topic = 'appointment-created'
LEFT JOIN notify.sms_messages m ON m.appointment_key = o.key AND m.kind = 'confirmation'
WHERE o.topic = 'appointment-created'
"""


async def stages(
    system: BenchSystem, bookings: list[Booking], accepted: dict[str, float]
) -> dict[str, list[float]]:
    """Seconds spent per step, from the rows' timestamps (Postgres `now()` is the start of
    each step's transaction): booking -> launch's transaction (webhook received, meeting
    created) -> relay -> notify's consumer -> dispatcher's send -> ACS accept."""
    conn = await asyncpg.connect(system.dsn)
    try:
        rows = {r["key"]: r for r in await conn.fetch(STAGES)}
    finally:
        await conn.close()
    steps: dict[str, list[float]] = {
        "webhook+meeting": [], "relay": [], "kafka+consumer": [], "dispatcher": [], "acs": []
    }  # fmt: skip
    for booking in bookings:
        row = rows.get(booking.key or "")
        if row is None or None in (row["relayed"], row["consumed"], row["dispatched"]):
            continue
        if booking.key not in accepted:
            continue
        points = [
            booking.sent_at,
            float(row["recorded"]),
            float(row["relayed"]),
            float(row["consumed"]),
            float(row["dispatched"]),
            accepted[booking.key],
        ]
        for name, before, after in zip(steps, points, points[1:], strict=False):
            steps[name].append(after - before)
    return steps


def service_env() -> dict[str, str]:
    """BENCH_SERVICE_ENV='{"EHR_DATABASE_POOL_MAX": "20"}' tries a setting on every service."""
    chosen = orjson.loads(os.environ.get("BENCH_SERVICE_ENV", "{}"))
    return {str(k): str(v) for k, v in chosen.items()}


async def _book_steadily(
    http: aiohttp.ClientSession, system: BenchSystem, bookings: list[Booking], rate: float
) -> float:
    """Books at a steady `rate` a second (each booking on time, not after the one before
    answered); the seconds it took."""
    began = time.perf_counter()
    tasks = []
    for i, booking in enumerate(bookings):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_book(http, system, booking)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - began


async def warm_up(
    http: aiohttp.ClientSession, system: BenchSystem, count: int, settle_s: float
) -> int:
    """Books `count` visits at WARMUP_RATE and waits for their SMS, then ANALYZEs the run's
    database; returns how many were booked. The run's database is seconds old: without this
    its tables have never been analysed, and every pooled connection caches generic plans
    made for empty tables (sequential scans of tables that grow by 100 rows a second) until
    autovacuum's first ANALYZE, up to a minute later. A system that has been running has
    statistics; this measures that system, not its first minute."""
    if count <= 0:
        return 0
    bookings = await _bookings(http, system, count)
    await _book_steadily(http, system, bookings, WARMUP_RATE)
    booked = sum(1 for b in bookings if b.key)
    await _sent(system.dsn, booked, settle_s)
    conn = await asyncpg.connect(system.dsn)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return booked


async def pipeline(
    rate: float, seconds: float, tenants: int, settle_s: float, warmup: int = 0
) -> dict[str, Any]:
    count = max(1, round(rate * seconds))
    async with (
        bench_system(tenants=tenants, extra_env=service_env()) as system,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=system.client_ssl(), limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as http,
    ):
        rtt = await kafka_round_trip(system.prefix, 30 if count < 100 else 200)
        settled = await warm_up(http, system, warmup, settle_s)
        bookings = await _bookings(http, system, count)
        cpu = {name: process_cpu_s(system.pid(name)) for name in system.children}
        broker = kafka_broker_pid()
        if broker is not None:
            cpu["kafka"] = process_cpu_s(broker)
        postgres = await backend_cpu_s(system.dsn)
        async with system.profiling("launch", "notify"):
            sending_s = await _book_steadily(http, system, bookings, rate)
            wanted = settled + sum(1 for b in bookings if b.key)
            # Done when notify has recorded every confirmation as sent (cheap to ask); the
            # ACS stand-in's message list is read once at the end.
            await _sent(system.dsn, wanted, settle_s)
            accepted = _accepted(await _messages(http, system))
            pids = {name: system.pid(name) for name in system.children}
            if broker is not None:
                pids["kafka"] = broker
            cpu = {name: process_cpu_s(pids[name]) - used for name, used in cpu.items()}
            cpu["postgres"] = sum(
                used - postgres.get(pid, 0.0)
                for pid, used in (await backend_cpu_s(system.dsn)).items()
            )
            steps = await stages(system, bookings, accepted)
    latencies = [accepted[b.key] - b.sent_at for b in bookings if b.key and b.key in accepted]
    missing = count - len(latencies)
    late = latencies + [math.inf] * missing
    return {
        "count": count,
        "rate": count / sending_s if sending_s > 0 else math.inf,
        "p50": percentile(late, 0.50),
        "p99": percentile(late, 0.99),
        "max": max(late) if late else math.inf,
        "missing": missing,
        "errors": sum(1 for b in bookings if b.error),
        "rtt_p50": percentile(rtt, 0.50),
        "rtt_p99": percentile(rtt, 0.99),
        "cpu": cpu,
        "steps": {name: (percentile(v, 0.5), percentile(v, 0.99)) for name, v in steps.items()},
    }


_measured: dict[bool, dict[str, Any]] = {}
_lock = asyncio.Lock()


async def measured(smoke: bool) -> dict[str, Any]:
    """One run, shared by the rows below."""
    async with _lock:
        if smoke not in _measured:
            _measured[smoke] = await _measure(smoke)
        return _measured[smoke]


async def _measure(smoke: bool) -> dict[str, Any]:
    if smoke:
        rate, seconds, tenants, settle = 5.0, 2.0, 2, 60.0
    else:
        rate = float(os.environ.get("BENCH_PIPELINE_RATE", "100"))
        seconds = float(os.environ.get("BENCH_PIPELINE_SECONDS", "60"))
        tenants = int(os.environ.get("BENCH_PIPELINE_TENANTS", "50"))
        settle = 600.0
    warmup = 0 if smoke else int(os.environ.get("BENCH_PIPELINE_WARMUP", "1000"))
    r = await pipeline(rate, seconds, tenants, settle, warmup)
    r["offered"] = rate
    print(
        f"  {r['count']} bookings at {r['rate']:.1f}/s over {tenants} EHR tenants:"
        f" p50 {r['p50'] * 1000:.0f} ms, p99 {r['p99'] * 1000:.0f} ms,"
        f" max {r['max'] * 1000:.0f} ms, {r['missing']} without SMS, {r['errors']} refused;"
        f" bare Kafka round trip p50 {r['rtt_p50'] * 1000:.1f} ms,"
        f" p99 {r['rtt_p99'] * 1000:.1f} ms",
        flush=True,
    )
    print(
        "  steps p50/p99 ms: "
        + ", ".join(f"{n} {a * 1000:.0f}/{b * 1000:.0f}" for n, (a, b) in r["steps"].items()),
        flush=True,
    )
    print(
        "  CPU per booking (whole run, sending and draining): "
        + ", ".join(f"{n} {c / r['count'] * 1000:.1f} ms" for n, c in r["cpu"].items()),
        flush=True,
    )
    return r


async def run(smoke: bool) -> Result:
    r = await measured(smoke)
    figure, baseline = r["p99"] * 1000, r["rtt_p99"] * 1000
    return Result(
        name=f"booking -> SMS p99 at {r['offered']:g}/s",
        figure=figure,
        unit="ms",
        baseline=baseline,
        ratio=figure / baseline if baseline > 0 else math.inf,
        goal=f"p99 <= {GOAL_MS:g} ms",
        meets_goal=figure <= GOAL_MS,
    )


async def cpu_per_booking(smoke: bool) -> Result:
    """What the latency goal rests on, and steadier than it on a shared machine: the CPU one
    booking costs across every process of the run (services, stand-ins, Postgres backends,
    the Kafka broker when this checkout runs it), against the budget the offered rate leaves
    (the machine's cores over the rate). A ratio near 1 means the goal measures queueing."""
    r = await measured(smoke)
    figure = sum(r["cpu"].values()) / r["count"] * 1000
    budget = len(os.sched_getaffinity(0)) * 1000 / r["offered"]
    return Result(
        name="booking -> SMS CPU per booking, all",
        figure=figure,
        unit="ms",
        baseline=budget,
        ratio=figure / budget,
        goal="(reported)",
        meets_goal=True,
    )


BENCHMARKS = [
    Benchmark("event pipeline booking -> SMS", run),
    Benchmark("event pipeline CPU per booking", cpu_per_booking),
]


if __name__ == "__main__":
    from bench.harness import print_table

    async def main(smoke: bool) -> list[Result]:
        return [await benchmark.run(smoke) for benchmark in BENCHMARKS]

    print_table(asyncio.run(main("--smoke" in sys.argv)))

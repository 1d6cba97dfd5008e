"""Issue 10, faults and privacy: a scripted day of video visits through the real services
(subprocesses, real Kafka and Postgres), with the broker SIGKILLed, Postgres restarted, every
service SIGKILLed and restarted, every event replayed and poison on every topic; then nothing
lost, nothing sent twice, every visit's facts right, and no patient data anywhere.

Not part of `make test`: it kills the shared broker and database. `make test-faults` runs it
alone (EHR_FAULTS=1); FAULTS_APPOINTMENTS sets the size of the day (default 60).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from infra import run
from infra.run import LOGS, TLS, RunningSystem, running_system
from tests.faults import checks
from tests.faults.day import Day
from tests.faults.faults import (
    KAFKA,
    SERVICES,
    FaultLog,
    inject_poison,
    kill_kafka,
    kill_service,
    replay_topics,
    restart_postgres,
)

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("EHR_FAULTS") != "1",
        reason="kills the shared Kafka broker and Postgres: run alone with `make test-faults`",
    ),
    pytest.mark.timeout(3600),
]
T = TypeVar("T")
# The server of PG_ADMIN_DSN (Makefile default), so the suite can run beside another cluster.
PG_ADMIN_DSN = os.environ.get("PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:15432/postgres")
PG = PG_ADMIN_DSN.rsplit("/", 1)[0]


async def settle(what: str, probe: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """Polls the system's state until it settles (bounded); returns the last observation."""
    deadline = time.monotonic() + 240
    while True:
        seen = await probe()
        if done(seen) or time.monotonic() > deadline:
            return seen
        print(f"faults: waiting for {what}...", flush=True)
        await asyncio.sleep(2)


async def inject(day: Day, system: RunningSystem, log: FaultLog, prefix: str) -> None:
    """Each fault once, spread over the day by how many visits have started."""
    await day.wait_started(0.10)
    await kill_kafka(log, down_s=10)
    await day.wait_started(0.25)
    await restart_postgres(log)
    for share, name in zip((0.40, 0.50, 0.60, 0.70), SERVICES, strict=True):
        await day.wait_started(share)
        await kill_service(system, name, log)
    await day.wait_started(0.80)
    await inject_poison(prefix, log)


async def drop(prefix: str, database: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()
    import asyncpg

    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


async def test_a_faulty_day_loses_nothing_and_leaks_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run_id = uuid.uuid4().hex[:8]
    prefix, database = f"faults{run_id}.", f"faults_{run_id}"
    # Its own database, topics, consumer groups and ACS number state: nothing shared with
    # `make run` or other tests, and nothing left from an earlier run.
    monkeypatch.setenv("EHR_KAFKA_TOPIC_PREFIX", prefix)
    monkeypatch.setenv("EHR_DATABASE_URL", f"{PG}/{database}")
    monkeypatch.setenv("MS_SANDBOX_NUMBERS_STATE_FILE", f"{tmp_path}/acs-numbers.json")
    # The delivery check reads every outbox row the day wrote: published rows must outlive
    # the run (a day is longer than the default retention of 10 minutes).
    monkeypatch.setenv("EHR_OUTBOX_RETENTION_MINUTES", "1440")
    # The day is compressed: visits booked two hours ahead are held within seconds, so their
    # waiting rooms are open from the booking (the lobby check times the patient's open).
    monkeypatch.setenv("EHR_LOBBY_OPENS_MINUTES", "1440")
    monkeypatch.setattr(run, "DATABASE", database)
    count = int(os.environ.get("FAULTS_APPOINTMENTS", "60"))
    began = time.monotonic()
    log = FaultLog()
    trusted = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
    passed = False
    try:
        async with (
            running_system() as system,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=trusted, limit=50),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=30),
            ) as http,
        ):
            print(f"\nfaults: a day of {count} appointments, topics {prefix}*, db {database}")
            day = Day(http, system.seeded.integration_id, count, concurrency=10)
            async with asyncio.TaskGroup() as group:
                group.create_task(day.run())
                group.create_task(inject(day, system, log, prefix))
            day_s = time.monotonic() - began
            print(f"faults: the day's visits are done after {day_s:.0f} s", flush=True)

            before = await checks.duplicates_absorbed(http)
            duplicate_deliveries = await replay_topics(prefix, log)
            conn = await checks.read_only(f"{PG}/{database}")
            try:
                delivered = await settle(
                    "every event in every consumer's inbox",
                    lambda: checks.delivery(conn, prefix),
                    lambda d: d.lost == 0,
                )
                await settle(
                    "every confirmation and reminder SMS",
                    lambda: day.sms.refresh(),
                    lambda _: not checks.sms_missing(day),
                )
                fact_problems = await settle(
                    "the analytics facts", lambda: checks.facts(conn, day), lambda p: not p
                )
                absorbed = await settle(
                    "the replayed duplicates",
                    lambda: checks.duplicates_absorbed(http),
                    lambda n: n - before >= duplicate_deliveries,
                )
                absorbed -= before
                unready = await settle("/readyz", lambda: checks.not_ready(http), lambda p: not p)
                dead_letters = await checks.dead_letter_problems(log, prefix)
                hits = await checks.privacy_hits(conn, http, prefix, LOGS)
            finally:
                await conn.close()
            doubles = checks.double_sends(day)
            elapsed = time.monotonic() - began
            print(
                "\nfaults: figures"
                f"\n  appointments        {count} ({sum(v.done for v in day.visits)} visits done:"
                f" {sum(v.outcome == 'completed' for v in day.visits)} completed,"
                f" {sum(v.outcome == 'no_show' for v in day.visits)} no-shows,"
                f" {sum(v.launched for v in day.visits)} launched by the provider,"
                f" {sum(v.reminded for v in day.visits)} reminded)"
                f"\n  events              {delivered.events} (outbox rows, every service)"
                f"\n  SMS sent            {day.sms.total}"
                f"\n  faults injected     {len(log.injected)}: "
                + "; ".join(log.injected)
                + f"\n  duplicates absorbed {absorbed} (replayed {sum(log.replayed.values())}"
                f" events = {duplicate_deliveries} duplicate deliveries, plus redeliveries)"
                f"\n  lost                {delivered.lost}"
                f"\n  double sends        {len(doubles)}"
                f"\n  privacy hits        {sum(len(h) for h in hits.values())}"
                f"\n  took                {elapsed:.0f} s (day {day_s:.0f} s)",
                flush=True,
            )
            assert delivered.lost == 0, delivered
            assert not doubles, doubles
            assert not checks.sms_missing(day), checks.sms_missing(day)
            assert not fact_problems, fact_problems[:20]
            assert absorbed >= duplicate_deliveries
            assert not unready, unready
            assert not dead_letters, dead_letters
            assert not any(hits.values()), {k: v[:10] for k, v in hits.items()}
            passed = True
    finally:
        if passed or os.environ.get("FAULTS_KEEP") != "1":
            await drop(prefix, database)

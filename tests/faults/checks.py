"""What must hold after the faulty day. The database is read directly but read-only (each
service's own schema), Kafka from offset 0, the stand-ins through their admin APIs."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from infra.run import PROCESSES
from libs.common.events import Topic, decode_event
from sandbox.ehr import TENANT_A, TENANT_B, EhrSettings, start_ehr
from tests.faults.day import Day, Visit
from tests.faults.faults import CONSUMERS, SERVICES, FaultLog, read_topic, valid_event_ids
from tests.support.privacy import find_markers, patient_markers, scan_schema

PORTS = {"launch": 8080, "config": 8081, "notify": 8082, "analytics": 8083}
METRICS = {p.name: url for p in PROCESSES if (url := p.metrics_url) is not None}
# Moments the outside world and the gateway stamped; rounding and notification transport.
TOLERANCE = timedelta(milliseconds=250)


async def read_only(dsn: str) -> asyncpg.Connection[Any]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(
        dsn, server_settings={"default_transaction_read_only": "on"}
    )
    return conn


@dataclass
class Delivery:
    events: int  # rows in every outbox
    unpublished: list[str]
    missing_on_topic: list[str]
    missing_in_inbox: list[str]

    @property
    def lost(self) -> int:
        return len(self.unpublished) + len(self.missing_on_topic) + len(self.missing_in_inbox)


async def delivery(conn: asyncpg.Connection[Any], prefix: str) -> Delivery:
    """Outbox rows all published, each published event on its topic, and every event on a
    topic in the inbox of each consumer of that topic."""
    on_topic = {str(t): valid_event_ids(await read_topic(prefix + t)) for t in Topic}
    events, unpublished, missing_on_topic, missing_in_inbox = 0, [], [], []
    for schema in SERVICES:
        rows = await conn.fetch(
            f'SELECT event_id::text AS id, topic, published_at FROM "{schema}".outbox'
        )
        events += len(rows)
        unpublished += [f"{schema}:{r['topic']}:{r['id']}" for r in rows if not r["published_at"]]
        missing_on_topic += [
            f"{schema}:{r['topic']}:{r['id']}"
            for r in rows
            if r["published_at"] and r["id"] not in on_topic[r["topic"]]
        ]
    for topic, consumers in CONSUMERS.items():
        for consumer in consumers:
            applied = {
                r["id"]
                for r in await conn.fetch(
                    f'SELECT event_id::text AS id FROM "{consumer}".inbox'
                    " WHERE consumer = $1 AND topic = $2",
                    prefix + consumer,
                    str(topic),
                )
            }
            missing_in_inbox += [f"{consumer}:{topic}:{i}" for i in on_topic[topic] - applied]
    return Delivery(events, unpublished, missing_on_topic, missing_in_inbox)


def fact_problems(visit: Visit, row: Any) -> list[str]:
    """The analytics facts of one visit against what the script did."""
    if row is None:
        return [f"visit {visit.index}: no facts"]
    problems = []
    want = "completed" if visit.outcome == "completed" else "no_show"
    if row["status"] != want:
        problems.append(f"status {row['status']} != {want}")
    if row["department"] != visit.department:
        problems.append(f"department {row['department']!r} != {visit.department!r}")
    if visit.outcome == "completed":
        assert visit.admitted_at is not None
        assert visit.ended_at is not None
        assert visit.lobby_from is not None
        assert visit.lobby_to is not None
        # The first lobby entry is the patient opening the link, somewhere in [from, to].
        shortest = (visit.admitted_at.timestamp() - visit.lobby_to) * 1000
        longest = (visit.admitted_at.timestamp() - visit.lobby_from) * 1000
        tol = TOLERANCE / timedelta(milliseconds=1)
        wait = row["lobby_wait_ms"]
        if wait is None or not shortest - tol <= wait <= longest + tol:
            problems.append(f"lobby wait {wait} ms not in [{shortest:.0f}, {longest:.0f}]")
        duration = (visit.ended_at - visit.admitted_at) / timedelta(milliseconds=1)
        if row["duration_ms"] is None or abs(row["duration_ms"] - duration) > tol:
            problems.append(f"duration {row['duration_ms']} ms != {duration:.0f}")
    else:
        if row["duration_ms"] != 0:
            problems.append(f"no-show duration {row['duration_ms']} != 0")
        if row["lobby_wait_ms"] is not None:
            problems.append(f"no-show lobby wait {row['lobby_wait_ms']}")
    return [f"visit {visit.index} ({visit.key}): {p}" for p in problems]


async def facts(conn: asyncpg.Connection[Any], day: Day) -> list[str]:
    rows = {
        r["appointment_key"]: r
        for r in await conn.fetch(
            "SELECT appointment_key, status, department, lobby_wait_ms, duration_ms"
            " FROM analytics.appointment_facts WHERE appointment_key = any($1::text[])",
            [v.key for v in day.visits],
        )
    }
    problems: list[str] = []
    for visit in day.visits:
        problems += fact_problems(visit, rows.get(visit.key))
    return problems


def double_sends(day: Day) -> list[str]:
    """Any appointment that got the same kind of SMS twice (the script books each once and
    never reschedules, so every kind is due at most once)."""
    return [
        f"{key}: {len(messages)} x {kind}"
        for key, kinds in day.sms.by_key.items()
        for kind, messages in kinds.items()
        if len(messages) > 1
    ]


def sms_missing(day: Day) -> list[str]:
    missing = []
    for visit in day.visits:
        kinds = day.sms.by_key.get(visit.key, {})
        if len(kinds.get("confirmation", [])) != 1:
            missing.append(f"visit {visit.index}: no confirmation")
        if visit.reminded and len(kinds.get("reminder", [])) != 1:
            missing.append(f"visit {visit.index}: no reminder")
    return missing


async def dead_letter_problems(log: FaultLog, prefix: str) -> list[str]:
    """Each poison message, parked once per consumer of its topic, with the reason."""
    problems = []
    for topic in CONSUMERS:
        parked = await read_topic(f"{prefix}{topic}.dlq")
        for poison in (p for p in log.poison if p.topic == prefix + topic):
            for consumer in CONSUMERS[topic]:
                found = [
                    dict(r.headers)
                    for r in parked
                    if r.value == poison.value
                    and dict(r.headers).get("consumer") == (prefix + consumer).encode()
                ]
                reasons = [h.get("reason", b"").decode() for h in found]
                if not any(reason.startswith(poison.reason) for reason in reasons):
                    problems.append(f"{topic} ({consumer}): {poison.reason!r} not parked {reasons}")
        # Nothing valid may have been parked: that would be an event given up on.
        for record in parked:
            try:
                decode_event(record.value)
            except Exception:  # noqa: S112 - the poison itself
                continue
            problems.append(f"{topic}.dlq holds a valid event: {dict(record.headers)}")
    return problems


async def not_ready(http: aiohttp.ClientSession) -> list[str]:
    problems = []
    for name, port in PORTS.items():
        try:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                if r.status != 200:
                    problems.append(f"{name}: {r.status} {await r.text()}")
        except (aiohttp.ClientError, OSError) as exc:
            problems.append(f"{name}: {exc!r}")
    return problems


_DUPLICATE = re.compile(r'^events_consumed_total\{[^}]*outcome="duplicate"[^}]*\} ([0-9.e+]+)$')


async def duplicates_absorbed(http: aiohttp.ClientSession) -> int:
    """Deliveries the inboxes recognised as repeats, per /metrics (since each process started)."""
    total = 0.0
    for url in METRICS.values():
        async with http.get(url) as r:
            for line in (await r.text()).splitlines():
                if found := _DUPLICATE.match(line):
                    total += float(found.group(1))
    return int(total)


async def markers() -> list[str]:
    """The sample patients' names, phone numbers in many formats and birth dates, from the
    EHR stand-in's deterministic data (rebuilt in-process: its FHIR API needs a token)."""
    ehr = await start_ehr(EhrSettings(port=0))
    try:
        found = set(patient_markers(ehr, TENANT_A)) | set(patient_markers(ehr, TENANT_B))
    finally:
        await ehr.close()
    for marker in list(found):
        if re.fullmatch(r"\d{10}", marker):
            a, b, c = marker[:3], marker[3:6], marker[6:]
            found |= {f"{a}.{b}.{c}", f"{a} {b} {c}", f"{a} {b}-{c}", f"+1 {a} {b} {c}"}
            found |= {f"+1-{a}-{b}-{c}", f"1-{a}-{b}-{c}", f"+1 ({a}) {b}-{c}", f"{b}-{c}"}
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", marker):
            y, m, d = marker.split("-")
            found |= {f"{m}/{d}/{y}", f"{d}/{m}/{y}", f"{y}{m}{d}", f"{d}.{m}.{y}"}
    return sorted(found)


def read_logs(logs: Path) -> list[tuple[str, str]]:
    return [(p.name, p.read_text("utf-8", "replace")) for p in sorted(logs.glob("*.log"))]


async def privacy_hits(
    conn: asyncpg.Connection[Any], http: aiohttp.ClientSession, prefix: str, logs: Path
) -> dict[str, list[str]]:
    found = await markers()
    hits: dict[str, list[str]] = {"tables": [], "topics": [], "logs": [], "metrics": []}
    for schema in SERVICES:
        hits["tables"] += [f"{schema}.{h}" for h in await scan_schema(conn, schema, found)]
    for topic in Topic:
        for name in (prefix + topic, f"{prefix}{topic}.dlq"):
            for record in await read_topic(name):
                parts = [record.value or b"", record.key or b""]
                parts += [k.encode() + b"=" + v for k, v in record.headers]
                text = b"\n".join(parts).decode("utf-8", "replace")
                where = f"{name}@{record.partition}:{record.offset}"
                hits["topics"] += [f"{where}: {m}" for m in find_markers(text, found)]
    for name, text in await asyncio.to_thread(read_logs, logs):
        for number, line in enumerate(text.splitlines(), 1):
            hits["logs"] += [f"{name}:{number}: {m}" for m in find_markers(line, found)]
    for name, url in METRICS.items():
        async with http.get(url) as r:
            hits["metrics"] += [f"{name}: {m}" for m in find_markers(await r.text(), found)]
    return hits

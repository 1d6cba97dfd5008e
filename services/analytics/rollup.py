"""The daily rollup: each visit adds one contribution to its (tenant, day, environment,
department, integration) row and to the histograms of its lobby wait and duration, per day,
per ISO week (the weekly tier lets a long report read weeks instead of days) and per tenant
and day (a per-day report reads one histogram per day). A histogram is one row whose array
holds the count of every bucket. An appointment that never became a visit (cancelled, not yet
held, nobody from staff came) contributes only the SMS sent for it.

A recomputed visit subtracts its previous contribution and adds the new one in the same
transaction, so the rollup always equals a fresh aggregation of the facts; `check` proves it.
"""

# ruff: noqa: S608 -- every statement here is built from constants: table and column names.
from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from services.analytics.histogram import THRESHOLDS_MS, bucket_of
from services.analytics.visit import VISIT_STATUSES

if TYPE_CHECKING:
    from libs.common.db import Connection

RollupKey = tuple[str, date, str, str, uuid.UUID]
FIGURES = ("lobby_wait", "duration")


@dataclass(frozen=True)
class Contribution:
    key: RollupKey
    visit: bool
    completed: bool
    sms_sent: int
    lobby_wait_ms: int | None
    duration_ms: int | None


def contribution(fact: Any) -> Contribution | None:
    """What a fact row adds to the rollup: nothing until its dimensions and day are known; a
    visit with its figures; any other appointment with only the SMS sent for it.

    The brief's "SMS sent" is how many were sent for the appointment, whatever became of it,
    so they are filed with the appointment, under its report day (facts.py: when it happened,
    or when it was booked for), like every other column of the report, rather than under the
    day each message went out. A day's row then describes one set of appointments, and the
    per-meeting list's SMS add up to it for the visits among them."""
    if fact["report_day"] is None:
        return None
    if fact["environment"] is None or fact["department"] is None or not fact["integration_id"]:
        return None
    visit = fact["status"] in VISIT_STATUSES
    if not visit and not fact["sms_sent"]:
        return None
    return Contribution(
        key=(
            fact["tenant_id"],
            fact["report_day"],
            fact["environment"],
            fact["department"],
            fact["integration_id"],
        ),
        visit=visit,
        completed=fact["status"] == "completed",
        sms_sent=int(fact["sms_sent"]),
        # A lobby wait measured for a meeting that was no visit is no figure of the report.
        lobby_wait_ms=fact["lobby_wait_ms"] if visit else None,
        duration_ms=fact["duration_ms"] if visit else None,
    )


def counts_as_visit(fact: Any) -> bool:
    c = contribution(fact)
    return c is not None and c.visit


def _usage_row(c: Contribution, sign: int) -> list[int]:
    return [
        sign if c.visit else 0,
        sign if c.completed else 0,
        sign if c.visit and not c.completed else 0,
        sign * c.sms_sent,
        sign if c.lobby_wait_ms is not None else 0,
        sign * (c.lobby_wait_ms or 0),
        sign if c.duration_ms is not None else 0,
        sign * (c.duration_ms or 0),
    ]


Move = tuple[Contribution | None, Contribution | None]


async def apply(conn: Connection, moves: Iterable[Move]) -> None:
    """Moves each visit's contribution from its old place (None: it did not count) to its new
    one; the moves of a whole poll add up to one statement per table."""
    usage: dict[RollupKey, list[int]] = {}
    buckets: dict[tuple[RollupKey, str, int], int] = defaultdict(int)
    for old, new in moves:
        if old == new:
            continue
        for c, sign in ((old, -1), (new, 1)):
            if c is None:
                continue
            row = _usage_row(c, sign)
            current = usage.get(c.key)
            if current is not None:
                row = [a + b for a, b in zip(current, row, strict=True)]
            usage[c.key] = row
            for figure, value in (("lobby_wait", c.lobby_wait_ms), ("duration", c.duration_ms)):
                if value is not None:
                    buckets[(c.key, figure, bucket_of(value))] += sign
    if not usage:
        return
    # Sorted keys keep the lock order the same in every transaction.
    keys = sorted(usage)
    columns = list(zip(*(usage[k] for k in keys), strict=True))
    await conn.execute(
        "INSERT INTO daily_usage AS u (tenant_id, day, environment, department, integration_id,"
        " visits, completed, no_show, sms_sent, lobby_wait_count, lobby_wait_sum_ms,"
        " duration_count, duration_sum_ms)"
        " SELECT * FROM unnest($1::text[], $2::date[], $3::text[], $4::text[], $5::uuid[],"
        "  $6::int[], $7::int[], $8::int[], $9::bigint[], $10::int[], $11::bigint[],"
        "  $12::int[], $13::bigint[])"
        " ON CONFLICT (tenant_id, day, environment, department, integration_id) DO UPDATE SET"
        "  visits = u.visits + excluded.visits, completed = u.completed + excluded.completed,"
        "  no_show = u.no_show + excluded.no_show, sms_sent = u.sms_sent + excluded.sms_sent,"
        "  lobby_wait_count = u.lobby_wait_count + excluded.lobby_wait_count,"
        "  lobby_wait_sum_ms = u.lobby_wait_sum_ms + excluded.lobby_wait_sum_ms,"
        "  duration_count = u.duration_count + excluded.duration_count,"
        "  duration_sum_ms = u.duration_sum_ms + excluded.duration_sum_ms",
        *(list(part) for part in zip(*keys, strict=True)),
        *(list(column) for column in columns),
    )
    await _add_histograms(conn, buckets)


def _dense(deltas: dict[int, int], length: int) -> list[int]:
    counts = [0] * length
    for bucket, n in deltas.items():
        counts[bucket] = n
    return counts


def _add_counts(
    table: str, key_columns: str, key_types: str, rows: dict[Any, dict[int, int]], first: int
) -> tuple[str, list[object]]:
    """An upsert adding each row's bucket deltas to its histogram (creating it if new), and its
    parameters, numbered from $first. The deltas of all rows travel as one flat array of
    equal-length slices, so one statement does every row."""
    keys = sorted(k for k, deltas in rows.items() if any(deltas.values()))
    if not keys:
        return "", []
    length = 1 + max(b for k in keys for b, n in rows[k].items() if n)
    flat = [n for k in keys for n in _dense(rows[k], length)]
    types = key_types.split(",")
    unnest = ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))
    flat_param, length_param = f"${first + len(types)}::int[]", f"${first + len(types) + 1}::int"
    sql = (
        f"INSERT INTO {table} AS h ({key_columns}, counts)"
        f" SELECT {key_columns},"
        f" ({flat_param})[(n - 1) * {length_param} + 1 : n * {length_param}]"
        f" FROM unnest({unnest}) WITH ORDINALITY AS k({key_columns}, n)"
        f" ON CONFLICT ({key_columns})"
        " DO UPDATE SET counts = add_counts(h.counts, excluded.counts)"
    )
    return sql, [*(list(part) for part in zip(*keys, strict=True)), flat, length]


DAILY_KEY = "tenant_id, day, environment, department, integration_id, figure"
WEEKLY_KEY = "tenant_id, week, environment, department, integration_id, figure"
TENANT_DAY_KEY = "tenant_id, day, figure"
HISTOGRAM_TABLES = (
    "daily_histogram_counts",
    "weekly_histogram_counts",
    "tenant_day_histogram_counts",
)


async def _add_histograms(conn: Connection, buckets: dict[tuple[RollupKey, str, int], int]) -> None:
    daily: dict[tuple[Any, ...], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    weekly: dict[tuple[Any, ...], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    tenant_day: dict[tuple[Any, ...], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for (key, figure, bucket), n in buckets.items():
        if n == 0:
            continue
        tenant, day, environment, department, integration = key
        week = day - timedelta(days=day.weekday())
        daily[(*key, figure)][bucket] += n
        weekly[(tenant, week, environment, department, integration, figure)][bucket] += n
        tenant_day[(tenant, day, figure)][bucket] += n
    # One round trip for the three tiers. Always the same tier order and sorted keys: the same
    # lock order in every transaction.
    statements: list[str] = []
    params: list[object] = []
    for table, key_columns, key_types, rows in (
        ("daily_histogram_counts", DAILY_KEY, "text,date,text,text,uuid,text", daily),
        ("weekly_histogram_counts", WEEKLY_KEY, "text,date,text,text,uuid,text", weekly),
        ("tenant_day_histogram_counts", TENANT_DAY_KEY, "text,date,text", tenant_day),
    ):
        sql, args = _add_counts(table, key_columns, key_types, rows, len(params) + 1)
        if sql:
            statements.append(sql)
            params += args
    if not statements:
        return
    *before, last = statements
    ctes = ", ".join(f"tier{i} AS ({sql})" for i, sql in enumerate(before))
    await conn.execute(f"WITH {ctes} {last}" if ctes else last, *params)


# Recomputes the rollup of one tenant from its facts and lists every row that differs.
_EXPECTED_USAGE = """
WITH expected AS (
    SELECT tenant_id, report_day AS day, environment, department, integration_id,
        count(*) FILTER (WHERE visit) AS visits,
        count(*) FILTER (WHERE status = 'completed') AS completed,
        count(*) FILTER (WHERE status = 'no_show') AS no_show,
        coalesce(sum(sms_sent), 0) AS sms_sent,
        count(lobby_wait_ms) FILTER (WHERE visit) AS lobby_wait_count,
        coalesce(sum(lobby_wait_ms) FILTER (WHERE visit), 0) AS lobby_wait_sum_ms,
        count(duration_ms) FILTER (WHERE visit) AS duration_count,
        coalesce(sum(duration_ms) FILTER (WHERE visit), 0) AS duration_sum_ms
    FROM appointment_facts, LATERAL (SELECT status IN ('completed', 'no_show') AS visit) AS v
    WHERE tenant_id = $1 AND (visit OR sms_sent <> 0) AND report_day IS NOT NULL
        AND environment IS NOT NULL AND department IS NOT NULL AND integration_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5
)
"""
_CHECK_USAGE = (
    _EXPECTED_USAGE
    + """, actual AS (
    SELECT * FROM daily_usage WHERE tenant_id = $1 AND (visits, completed, no_show, sms_sent,
        lobby_wait_count, lobby_wait_sum_ms, duration_count, duration_sum_ms)
        <> (0, 0, 0, 0, 0, 0, 0, 0)
)
SELECT coalesce(e.day, a.day) AS day, coalesce(e.department, a.department) AS department
FROM expected e FULL JOIN actual a USING (tenant_id, day, environment, department, integration_id)
WHERE (e.visits, e.completed, e.no_show, e.sms_sent, e.lobby_wait_count, e.lobby_wait_sum_ms,
       e.duration_count, e.duration_sum_ms)
    IS DISTINCT FROM (a.visits, a.completed, a.no_show, a.sms_sent, a.lobby_wait_count,
       a.lobby_wait_sum_ms, a.duration_count, a.duration_sum_ms)
"""
)

_EXPECTED_HISTOGRAMS = """
WITH visits AS (
    SELECT * FROM appointment_facts
    WHERE tenant_id = $1 AND status IN ('completed', 'no_show') AND report_day IS NOT NULL
        AND environment IS NOT NULL AND department IS NOT NULL AND integration_id IS NOT NULL
), expected AS (
    SELECT tenant_id, report_day AS day, environment, department, integration_id, figure,
        width_bucket(value, $2::bigint[])::smallint AS bucket, count(*) AS visits
    FROM visits, LATERAL (VALUES ('lobby_wait', lobby_wait_ms), ('duration', duration_ms))
        AS v(figure, value)
    WHERE value IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5, 6, 7
)
"""


# A histogram table's rows unnested back into (key..., bucket, visits) rows.
def _buckets(table: str, key_columns: str) -> str:
    return (
        f"SELECT {key_columns}, (o - 1)::smallint AS bucket, n AS visits"
        f" FROM {table}, unnest(counts) WITH ORDINALITY AS u(n, o)"
        " WHERE tenant_id = $1 AND n <> 0"
    )


_CHECK_HISTOGRAMS = (
    _EXPECTED_HISTOGRAMS
    + f""", actual AS ({_buckets("daily_histogram_counts", DAILY_KEY)})
SELECT coalesce(e.day, a.day) AS day, coalesce(e.figure, a.figure) AS figure
FROM expected e FULL JOIN actual a
    USING (tenant_id, day, environment, department, integration_id, figure, bucket)
WHERE e.visits IS DISTINCT FROM a.visits
"""
)

_CHECK_TENANT_DAY = (
    _EXPECTED_HISTOGRAMS
    + f""", per_day AS (
    SELECT tenant_id, day, figure, bucket, sum(visits) AS visits FROM expected GROUP BY 1, 2, 3, 4
), actual AS ({_buckets("tenant_day_histogram_counts", TENANT_DAY_KEY)})
SELECT coalesce(e.day, a.day) AS day, coalesce(e.figure, a.figure) AS figure
FROM per_day e FULL JOIN actual a USING (tenant_id, day, figure, bucket)
WHERE e.visits IS DISTINCT FROM a.visits
"""
)

_CHECK_WEEKLY = (
    _EXPECTED_HISTOGRAMS
    + f""", per_week AS (
    SELECT tenant_id, day - (extract(isodow FROM day)::int - 1) AS week, environment, department,
        integration_id, figure, bucket, sum(visits) AS visits
    FROM expected GROUP BY 1, 2, 3, 4, 5, 6, 7
), actual AS ({_buckets("weekly_histogram_counts", WEEKLY_KEY)})
SELECT coalesce(e.week, a.week) AS week, coalesce(e.figure, a.figure) AS figure
FROM per_week e FULL JOIN actual a
    USING (tenant_id, week, environment, department, integration_id, figure, bucket)
WHERE e.visits IS DISTINCT FROM a.visits
"""
)


async def check(conn: Connection, tenant_id: str) -> list[str]:
    """Differences between the rollup and a recomputation from the facts; empty when equal."""
    problems = [
        f"daily_usage differs on {r['day']} for {r['department']!r}"
        for r in await conn.fetch(_CHECK_USAGE, tenant_id)
    ]
    problems += [
        f"daily_histogram_counts differ on {r['day']} for {r['figure']}"
        for r in await conn.fetch(_CHECK_HISTOGRAMS, tenant_id, THRESHOLDS_MS)
    ]
    problems += [
        f"tenant_day_histogram_counts differ on {r['day']} for {r['figure']}"
        for r in await conn.fetch(_CHECK_TENANT_DAY, tenant_id, THRESHOLDS_MS)
    ]
    problems += [
        f"weekly_histogram_counts differ in the week of {r['week']} for {r['figure']}"
        for r in await conn.fetch(_CHECK_WEEKLY, tenant_id, THRESHOLDS_MS)
    ]
    return problems


_REBUILD_HISTOGRAMS = (
    _EXPECTED_HISTOGRAMS
    + f""", daily AS (
    INSERT INTO daily_histogram_counts
    SELECT {DAILY_KEY}, histogram_counts(array_agg(bucket), array_agg(visits))
    FROM expected GROUP BY 1, 2, 3, 4, 5, 6
), weekly AS (
    INSERT INTO weekly_histogram_counts
    SELECT tenant_id, day - (extract(isodow FROM day)::int - 1), environment, department,
        integration_id, figure, histogram_counts(array_agg(bucket), array_agg(visits))
    FROM expected GROUP BY 1, 2, 3, 4, 5, 6
)
INSERT INTO tenant_day_histogram_counts
SELECT tenant_id, day, figure, histogram_counts(array_agg(bucket), array_agg(visits))
FROM expected GROUP BY 1, 2, 3
"""
)


async def rebuild(conn: Connection, tenant_id: str) -> None:
    """Replaces a tenant's rollup with one aggregated from its facts (after a bulk load, or
    to repair what `check` reported). Run it in a transaction."""
    await conn.execute("DELETE FROM daily_usage WHERE tenant_id = $1", tenant_id)
    await conn.execute(
        "INSERT INTO daily_usage " + _EXPECTED_USAGE + " SELECT * FROM expected",
        tenant_id,
    )
    for table in HISTOGRAM_TABLES:
        await conn.execute(f"DELETE FROM {table} WHERE tenant_id = $1", tenant_id)
    await conn.execute(_REBUILD_HISTOGRAMS, tenant_id, THRESHOLDS_MS)

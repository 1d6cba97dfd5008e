"""The daily rollup: each visit adds one contribution to its (tenant, day, environment,
department, integration) row and to the histogram buckets of its lobby wait and duration,
per day and per ISO week (the weekly tier lets a long report read weeks instead of days).

A recomputed visit subtracts its previous contribution and adds the new one in the same
transaction, so the rollup always equals a fresh aggregation of the facts; `check` proves it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from services.analytics.histogram import THRESHOLDS_MS, bucket_of

if TYPE_CHECKING:
    from libs.common.db import Connection

RollupKey = tuple[str, date, str, str, uuid.UUID]
FIGURES = ("lobby_wait", "duration")


@dataclass(frozen=True)
class Contribution:
    key: RollupKey
    completed: bool
    sms_sent: int
    lobby_wait_ms: int | None
    duration_ms: int | None


def contribution(fact: Any) -> Contribution | None:
    """What a fact row adds to the rollup: nothing until it is a visit with known dimensions."""
    if fact["status"] not in ("completed", "no_show") or fact["report_day"] is None:
        return None
    if fact["environment"] is None or fact["department"] is None or not fact["integration_id"]:
        return None
    return Contribution(
        key=(
            fact["tenant_id"],
            fact["report_day"],
            fact["environment"],
            fact["department"],
            fact["integration_id"],
        ),
        completed=fact["status"] == "completed",
        sms_sent=int(fact["sms_sent"]),
        lobby_wait_ms=fact["lobby_wait_ms"],
        duration_ms=fact["duration_ms"],
    )


def _usage_row(c: Contribution, sign: int) -> list[int]:
    return [
        sign,
        sign if c.completed else 0,
        0 if c.completed else sign,
        sign * c.sms_sent,
        sign if c.lobby_wait_ms is not None else 0,
        sign * (c.lobby_wait_ms or 0),
        sign if c.duration_ms is not None else 0,
        sign * (c.duration_ms or 0),
    ]


async def apply(conn: Connection, old: Contribution | None, new: Contribution | None) -> None:
    if old == new:
        return
    usage: dict[RollupKey, list[int]] = {}
    buckets: dict[tuple[RollupKey, str, int], int] = defaultdict(int)
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
    changed = sorted(k for k, n in buckets.items() if n != 0)
    if not changed:
        return
    await conn.execute(
        "WITH fine AS (INSERT INTO daily_histograms AS h (tenant_id, day, environment,"
        "  department, integration_id, figure, bucket, visits)"
        "  SELECT * FROM unnest($1::text[], $2::date[], $3::text[], $4::text[], $5::uuid[],"
        "   $6::text[], $7::smallint[], $8::int[])"
        "  ON CONFLICT (tenant_id, day, environment, department, integration_id, figure, bucket)"
        "  DO UPDATE SET visits = h.visits + excluded.visits),"
        " weekly AS (INSERT INTO weekly_histograms AS w (tenant_id, week, environment,"
        "  department, integration_id, figure, bucket, visits)"
        "  SELECT tenant_id, day - (extract(isodow FROM day)::int - 1), environment,"
        "   department, integration_id, figure, bucket, sum(visits)"
        "  FROM unnest($1::text[], $2::date[], $3::text[], $4::text[], $5::uuid[],"
        "   $6::text[], $7::smallint[], $8::int[])"
        "   AS u(tenant_id, day, environment, department, integration_id, figure, bucket, visits)"
        "  GROUP BY 1, 2, 3, 4, 5, 6, 7 HAVING sum(visits) <> 0 ORDER BY 1, 2, 3, 4, 5, 6, 7"
        "  ON CONFLICT (tenant_id, week, environment, department, integration_id, figure, bucket)"
        "  DO UPDATE SET visits = w.visits + excluded.visits)"
        " INSERT INTO tenant_day_histograms AS t (tenant_id, day, figure, bucket, visits)"
        " SELECT tenant_id, day, figure, bucket, sum(visits) FROM unnest($1::text[],"
        "  $2::date[], $6::text[], $7::smallint[], $8::int[])"
        "  AS u(tenant_id, day, figure, bucket, visits) GROUP BY 1, 2, 3, 4"
        " ON CONFLICT (tenant_id, day, figure, bucket)"
        " DO UPDATE SET visits = t.visits + excluded.visits",
        [k[0][0] for k in changed],
        [k[0][1] for k in changed],
        [k[0][2] for k in changed],
        [k[0][3] for k in changed],
        [k[0][4] for k in changed],
        [k[1] for k in changed],
        [k[2] for k in changed],
        [buckets[k] for k in changed],
    )


# Recomputes the rollup of one tenant from its facts and lists every row that differs.
_EXPECTED_USAGE = """
WITH expected AS (
    SELECT tenant_id, report_day AS day, environment, department, integration_id,
        count(*) AS visits,
        count(*) FILTER (WHERE status = 'completed') AS completed,
        count(*) FILTER (WHERE status = 'no_show') AS no_show,
        coalesce(sum(sms_sent), 0) AS sms_sent,
        count(lobby_wait_ms) AS lobby_wait_count,
        coalesce(sum(lobby_wait_ms), 0) AS lobby_wait_sum_ms,
        count(duration_ms) AS duration_count,
        coalesce(sum(duration_ms), 0) AS duration_sum_ms
    FROM appointment_facts
    WHERE tenant_id = $1 AND status IN ('completed', 'no_show') AND report_day IS NOT NULL
        AND environment IS NOT NULL AND department IS NOT NULL AND integration_id IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5
)
"""
_CHECK_USAGE = (
    _EXPECTED_USAGE  # noqa: S608 (constant SQL, no input)
    + """, actual AS (
    SELECT * FROM daily_usage WHERE tenant_id = $1 AND visits <> 0
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
_CHECK_HISTOGRAMS = (
    _EXPECTED_HISTOGRAMS  # noqa: S608 (constant SQL, no input)
    + """, actual AS (
    SELECT * FROM daily_histograms WHERE tenant_id = $1 AND visits <> 0
)
SELECT coalesce(e.day, a.day) AS day, coalesce(e.figure, a.figure) AS figure
FROM expected e FULL JOIN actual a
    USING (tenant_id, day, environment, department, integration_id, figure, bucket)
WHERE e.visits IS DISTINCT FROM a.visits
"""
)

_CHECK_TENANT_DAY = (
    _EXPECTED_HISTOGRAMS  # noqa: S608 (constant SQL, no input)
    + """, per_day AS (
    SELECT tenant_id, day, figure, bucket, sum(visits) AS visits FROM expected GROUP BY 1, 2, 3, 4
), actual AS (
    SELECT * FROM tenant_day_histograms WHERE tenant_id = $1 AND visits <> 0
)
SELECT coalesce(e.day, a.day) AS day, coalesce(e.figure, a.figure) AS figure
FROM per_day e FULL JOIN actual a USING (tenant_id, day, figure, bucket)
WHERE e.visits IS DISTINCT FROM a.visits
"""
)

_CHECK_WEEKLY = (
    _EXPECTED_HISTOGRAMS  # noqa: S608 (constant SQL, no input)
    + """, per_week AS (
    SELECT tenant_id, day - (extract(isodow FROM day)::int - 1) AS week, environment, department,
        integration_id, figure, bucket, sum(visits) AS visits
    FROM expected GROUP BY 1, 2, 3, 4, 5, 6, 7
), actual AS (
    SELECT * FROM weekly_histograms WHERE tenant_id = $1 AND visits <> 0
)
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
        f"daily_histograms differ on {r['day']} for {r['figure']}"
        for r in await conn.fetch(_CHECK_HISTOGRAMS, tenant_id, THRESHOLDS_MS)
    ]
    problems += [
        f"tenant_day_histograms differ on {r['day']} for {r['figure']}"
        for r in await conn.fetch(_CHECK_TENANT_DAY, tenant_id, THRESHOLDS_MS)
    ]
    problems += [
        f"weekly_histograms differ in the week of {r['week']} for {r['figure']}"
        for r in await conn.fetch(_CHECK_WEEKLY, tenant_id, THRESHOLDS_MS)
    ]
    return problems


async def rebuild(conn: Connection, tenant_id: str) -> None:
    """Replaces a tenant's rollup with one aggregated from its facts (after a bulk load, or
    to repair what `check` reported). Run it in a transaction."""
    await conn.execute("DELETE FROM daily_usage WHERE tenant_id = $1", tenant_id)
    await conn.execute("DELETE FROM daily_histograms WHERE tenant_id = $1", tenant_id)
    await conn.execute(
        "INSERT INTO daily_usage " + _EXPECTED_USAGE + " SELECT * FROM expected",  # noqa: S608
        tenant_id,
    )
    await conn.execute(
        "INSERT INTO daily_histograms " + _EXPECTED_HISTOGRAMS + " SELECT * FROM expected",  # noqa: S608
        tenant_id,
        THRESHOLDS_MS,
    )
    await conn.execute("DELETE FROM weekly_histograms WHERE tenant_id = $1", tenant_id)
    await conn.execute(
        "INSERT INTO weekly_histograms SELECT tenant_id, day - (extract(isodow FROM day)::int - 1),"
        " environment, department, integration_id, figure, bucket, sum(visits)"
        " FROM daily_histograms WHERE tenant_id = $1 GROUP BY 1, 2, 3, 4, 5, 6, 7",
        tenant_id,
    )
    await conn.execute("DELETE FROM tenant_day_histograms WHERE tenant_id = $1", tenant_id)
    await conn.execute(
        "INSERT INTO tenant_day_histograms SELECT tenant_id, day, figure, bucket, sum(visits)"
        " FROM daily_histograms WHERE tenant_id = $1 GROUP BY 1, 2, 3, 4",
        tenant_id,
    )

"""The report queries. Every one takes the tenant id first and filters on it: a signed-in
admin only ever reads their own organisation's figures.

Usage figures come from the daily rollup (a 90-day report reads a few thousand rows, however
many visits there were); the per-meeting list pages through the facts with a keyset cursor.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal

from services.analytics.histogram import representative_ms

if TYPE_CHECKING:
    import asyncpg

GroupBy = Literal["day", "department", "environment", "integration"]
GROUP_COLUMNS: dict[GroupBy, str] = {
    "day": "day::text",
    "department": "department",
    "environment": "environment",
    "integration": "integration_id::text",
}
NOT_SET = "not set"


@dataclass
class Figure:
    """One figure (lobby wait or duration) over a group: exact count and sum, and the
    histogram buckets holding its nearest-rank median and p90 (see histogram.py)."""

    count: int = 0
    sum_ms: int = 0
    median_bucket: int | None = None
    p90_bucket: int | None = None

    def summary(self) -> dict[str, float | int | None]:
        def seconds(bucket: int | None) -> float | None:
            return None if bucket is None else round(representative_ms(bucket) / 1000, 1)

        return {
            "count": self.count,
            "mean": round(self.sum_ms / self.count / 1000, 1) if self.count else None,
            "median": seconds(self.median_bucket),
            "p90": seconds(self.p90_bucket),
        }


@dataclass
class UsageRow:
    group: str
    appointments: int = 0
    completed: int = 0
    no_show: int = 0
    sms_sent: int = 0
    lobby_wait: Figure = field(default_factory=Figure)
    duration: Figure = field(default_factory=Figure)

    def as_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "appointments": self.appointments,
            "completed": self.completed,
            "no_show": self.no_show,
            "lobby_wait_s": self.lobby_wait.summary(),
            "duration_s": self.duration.summary(),
            "sms_sent": self.sms_sent,
        }


@dataclass
class UsageReport:
    start: date
    end: date
    group_by: GroupBy
    rows: list[UsageRow]
    totals: UsageRow


# Counts and sums per group, and for the whole range (the row with total true).
_SUMS = """
SELECT {column} AS grp, grouping({column}) = 1 AS total,
    coalesce(sum(visits), 0)::bigint AS visits, coalesce(sum(completed), 0)::bigint AS completed,
    coalesce(sum(no_show), 0)::bigint AS no_show, coalesce(sum(sms_sent), 0)::bigint AS sms_sent,
    coalesce(sum(lobby_wait_count), 0)::bigint AS lw_count,
    coalesce(sum(lobby_wait_sum_ms), 0)::bigint AS lw_sum,
    coalesce(sum(duration_count), 0)::bigint AS d_count,
    coalesce(sum(duration_sum_ms), 0)::bigint AS d_sum
FROM daily_usage
WHERE tenant_id = $1 AND day BETWEEN $2 AND $3
GROUP BY GROUPING SETS (({column}), ())
"""

# The buckets of the nearest-rank median and p90 per group and figure, from `{counts}`:
# rows (grp, figure, bucket, n) with one row per bucket. A percentile's bucket is the first,
# in bucket order, whose running count reaches max(1, ceil(q * count)); the rank is computed
# in float8 like histogram.percentile_ms, so both pick the same bucket. Only two rows per
# group come back, instead of every bucket of every group.
_RANKED = """
SELECT grp, figure, min(bucket) FILTER (WHERE seen >= r1) AS b1,
    min(bucket) FILTER (WHERE seen >= r2) AS b2
FROM (
    SELECT grp, figure, bucket, sum(n) OVER (PARTITION BY grp, figure ORDER BY bucket) AS seen,
        greatest(1, ceil($4::float8 * sum(n) OVER (PARTITION BY grp, figure))) AS r1,
        greatest(1, ceil($5::float8 * sum(n) OVER (PARTITION BY grp, figure))) AS r2
    FROM ({counts}) AS counts
) AS running
GROUP BY grp, figure
"""

# Per day: the tenant-level histograms are already one row per day and bucket.
_PER_DAY = """
SELECT day AS grp, figure, bucket, visits AS n FROM tenant_day_histograms
WHERE tenant_id = $1 AND day BETWEEN $2 AND $3 AND visits <> 0
"""
_PER_DAY_TOTAL = """
SELECT NULL::date AS grp, figure, bucket, sum(visits)::int AS n FROM tenant_day_histograms
WHERE tenant_id = $1 AND day BETWEEN $2 AND $3 GROUP BY figure, bucket HAVING sum(visits) <> 0
"""
# Per dimension: whole weeks from the weekly tier, the days at either end from the daily one;
# $6..$7 are the days the whole weeks cover (none when $6 > $7). Groups are compared in the
# "C" collation: hashing and sorting by the locale's collation costs far more, for nothing.
_PER_DIMENSION = """
SELECT grp, figure, bucket, sum(visits)::int AS n FROM (
    SELECT {column} AS grp, figure, bucket, visits FROM weekly_histograms
    WHERE tenant_id = $1 AND week BETWEEN $6 AND $7::date - 6
    UNION ALL
    SELECT {column}, figure, bucket, visits FROM daily_histograms
    WHERE tenant_id = $1
        AND (day BETWEEN $2 AND $6::date - 1 OR day BETWEEN $7::date + 1 AND $3)
) AS h
GROUP BY grp, figure, bucket HAVING sum(visits) <> 0
"""
_PER_DIMENSION_TOTAL = (
    "SELECT NULL AS grp, figure, bucket, sum(n)::int AS n FROM per_group GROUP BY 2, 3"
)

PERCENTILE_GROUPS: dict[GroupBy, str] = {
    "department": 'department COLLATE "C"',
    "environment": 'environment COLLATE "C"',
    "integration": "integration_id",
}


def percentile_sql(group_by: GroupBy) -> str:
    """Rows (grp text, total bool, figure, b1, b2): the median (b1) and p90 (b2) buckets per
    group, and for the whole range in the row with total true."""
    if group_by == "day":
        groups, total = _PER_DAY, _PER_DAY_TOTAL
        prefix = ""
    else:
        per_group = _PER_DIMENSION.format(column=PERCENTILE_GROUPS[group_by])
        prefix = f"WITH per_group AS MATERIALIZED ({per_group})"
        groups, total = "SELECT * FROM per_group", _PER_DIMENSION_TOTAL
    return (
        f"{prefix} SELECT grp::text, false AS total, figure, b1, b2"  # noqa: S608 (constants)
        f" FROM ({_RANKED.format(counts=groups)}) AS g"
        f" UNION ALL SELECT NULL, true, figure, b1, b2 FROM ({_RANKED.format(counts=total)}) AS t"
    )


def whole_weeks(start: date, end: date) -> tuple[date, date]:
    """The first and last day of the whole ISO weeks (Monday to Sunday) inside start..end;
    first > last when there is none."""
    first = start + timedelta(days=-start.weekday() % 7)
    last = end - timedelta(days=(end.weekday() + 1) % 7)
    if first > last:
        return end + timedelta(days=1), end
    return first, last


async def usage(
    db: asyncpg.Pool, tenant_id: str, start: date, end: date, group_by: GroupBy
) -> UsageReport:
    column = GROUP_COLUMNS[group_by]
    args: list[object] = [tenant_id, start, end, 0.5, 0.9]
    if group_by != "day":
        args += whole_weeks(start, end)
    async with db.acquire() as conn:
        sums = await conn.fetch(_SUMS.format(column=column), tenant_id, start, end)
        percentiles = await conn.fetch(percentile_sql(group_by), *args)
    rows: dict[str, UsageRow] = {}
    if group_by == "day":
        days = [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]
        rows = {day: UsageRow(day) for day in days}
    totals = UsageRow("total")
    for r in sums:
        row = totals if r["total"] else rows.setdefault(r["grp"], UsageRow(r["grp"]))
        row.appointments, row.completed, row.no_show = r["visits"], r["completed"], r["no_show"]
        row.sms_sent = r["sms_sent"]
        row.lobby_wait.count, row.lobby_wait.sum_ms = r["lw_count"], r["lw_sum"]
        row.duration.count, row.duration.sum_ms = r["d_count"], r["d_sum"]
    for r in percentiles:
        row = totals if r["total"] else rows.setdefault(r["grp"], UsageRow(r["grp"]))
        figure = row.lobby_wait if r["figure"] == "lobby_wait" else row.duration
        figure.median_bucket, figure.p90_bucket = r["b1"], r["b2"]
    return UsageReport(start, end, group_by, [rows[k] for k in sorted(rows)], totals)


@dataclass(frozen=True)
class Meeting:
    meeting_id: str
    start_time: datetime | None
    report_at: datetime
    lobby_wait_ms: int | None
    duration_ms: int | None
    status: str
    attendees: int
    department: str | None
    environment: str | None
    sms_sent: int

    def as_json(self) -> dict[str, Any]:
        return {
            "meeting_id": self.meeting_id,
            "start_time": self.start_time.isoformat() if self.start_time else None,
            "lobby_wait_s": None if self.lobby_wait_ms is None else self.lobby_wait_ms / 1000,
            "duration_s": None if self.duration_ms is None else self.duration_ms / 1000,
            "status": STATUS_LABELS.get(self.status, self.status),
            "attendees": self.attendees,
            "department": self.department,
            "environment": self.environment,
            "sms_sent": self.sms_sent,
        }


STATUS_LABELS = {"completed": "Completed", "no_show": "No show"}


class BadCursor(ValueError):
    pass


def encode_cursor(meeting: Meeting) -> str:
    raw = f"{meeting.report_at.isoformat()}|{meeting.meeting_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, key = raw.split("|", 1)
        return datetime.fromisoformat(at), key
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("the page cursor is not valid") from None


def day_bounds(start: date, end: date) -> tuple[datetime, datetime]:
    return (
        datetime.combine(start, time(), UTC),
        datetime.combine(end + timedelta(days=1), time(), UTC),
    )


async def meetings(
    db: asyncpg.Pool,
    tenant_id: str,
    start: date,
    end: date,
    limit: int,
    after: tuple[datetime, str] | None = None,
) -> tuple[list[Meeting], str | None]:
    """One page of visits, newest first, and the cursor of the next page (None at the end)."""
    low, high = day_bounds(start, end)
    # The cursor bounds the ordering key, so the page starts where the last one stopped.
    top_at, top_key = after if after else (high, "")
    rows = await db.fetch(
        "SELECT appointment_key, started_at, report_at, lobby_wait_ms, duration_ms, status,"
        " attendees, department, environment, sms_sent FROM appointment_facts"
        " WHERE tenant_id = $1 AND status IN ('completed', 'no_show')"
        " AND report_at >= $2 AND report_at < $3"
        " AND (report_at, appointment_key) < ($4, $5)"
        " ORDER BY report_at DESC, appointment_key DESC LIMIT $6",
        tenant_id,
        low,
        high,
        top_at,
        top_key,
        limit + 1,
    )
    page = [
        Meeting(
            r["appointment_key"],
            r["started_at"],
            r["report_at"],
            r["lobby_wait_ms"],
            r["duration_ms"],
            r["status"],
            r["attendees"],
            r["department"],
            r["environment"],
            r["sms_sent"],
        )
        for r in rows[:limit]
    ]
    return page, encode_cursor(page[-1]) if len(rows) > limit else None


@dataclass(frozen=True)
class Allocation:
    month: str
    completed: int
    allocation: int | None

    def as_json(self) -> dict[str, Any]:
        if self.allocation is None:
            remaining: int | str = NOT_SET
            exceeded: bool | str = NOT_SET
            exceeded_by: int | str = NOT_SET
        else:
            remaining = max(0, self.allocation - self.completed)
            exceeded = self.completed > self.allocation
            exceeded_by = max(0, self.completed - self.allocation)
        return {
            "month": self.month,
            "completed_appointments": self.completed,
            "monthly_allocation": NOT_SET if self.allocation is None else self.allocation,
            "remaining_allocation": remaining,
            "exceeded_limit": exceeded,
            "exceeded_by": exceeded_by,
        }


def month_bounds(month: date) -> tuple[date, date]:
    first = month.replace(day=1)
    following = (first + timedelta(days=32)).replace(day=1)
    return first, following - timedelta(days=1)


async def allocation(db: asyncpg.Pool, tenant_id: str, month: date) -> Allocation:
    first, last = month_bounds(month)
    async with db.acquire() as conn:
        completed = await conn.fetchval(
            "SELECT coalesce(sum(completed), 0) FROM daily_usage"
            " WHERE tenant_id = $1 AND day BETWEEN $2 AND $3",
            tenant_id,
            first,
            last,
        )
        allocated = await conn.fetchval(
            "SELECT monthly_allocation FROM tenant_allocations WHERE tenant_id = $1", tenant_id
        )
    return Allocation(first.strftime("%Y-%m"), int(completed), allocated)

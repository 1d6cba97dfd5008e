"""The report queries. Every one takes the tenant id first and filters on it: a signed-in
admin only ever reads their own organisation's figures.

Usage figures come from the daily rollup (a 90-day report reads about a thousand count rows
and a few hundred histograms, however many visits there were); the per-meeting list pages
through the facts with a keyset cursor.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import zip_longest
from typing import TYPE_CHECKING, Any, Literal

from services.analytics.histogram import percentile_bucket, representative_ms

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

    def figure(self, name: str) -> Figure:
        return self.lobby_wait if name == "lobby_wait" else self.duration

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

# Per day: one tenant-level histogram per day and figure.
_PER_DAY = """
SELECT day::text AS grp, figure, counts FROM tenant_day_histogram_counts
WHERE tenant_id = $1 AND day BETWEEN $2 AND $3
"""
# Per dimension: whole weeks from the weekly tier, the days at either end from the daily one;
# $4..$5 are the days the whole weeks cover (none when $4 > $5).
_PER_DIMENSION = """
SELECT {column}::text AS grp, figure, counts FROM weekly_histogram_counts
WHERE tenant_id = $1 AND week BETWEEN $4 AND $5::date - 6
UNION ALL
SELECT {column}::text, figure, counts FROM daily_histogram_counts
WHERE tenant_id = $1 AND (day BETWEEN $2 AND $4::date - 1 OR day BETWEEN $5::date + 1 AND $3)
"""
HISTOGRAM_GROUPS: dict[GroupBy, str] = {
    "department": "department",
    "environment": "environment",
    "integration": "integration_id",
}


def histogram_sql(group_by: GroupBy) -> str:
    """Rows (grp, figure, counts): the histograms that make up each group over the range."""
    if group_by == "day":
        return _PER_DAY
    return _PER_DIMENSION.format(column=HISTOGRAM_GROUPS[group_by])


def whole_weeks(start: date, end: date) -> tuple[date, date]:
    """The first and last day of the whole ISO weeks (Monday to Sunday) inside start..end;
    first > last when there is none."""
    first = start + timedelta(days=-start.weekday() % 7)
    last = end - timedelta(days=(end.weekday() + 1) % 7)
    if first > last:
        return end + timedelta(days=1), end
    return first, last


def _sum_histograms(histograms: list[list[int]]) -> list[int]:
    if len(histograms) == 1:
        return histograms[0]
    return [sum(column) for column in zip_longest(*histograms, fillvalue=0)]


def _set_percentiles(figure: Figure, counts: list[int]) -> None:
    figure.median_bucket = percentile_bucket(counts, 0.5)
    figure.p90_bucket = percentile_bucket(counts, 0.9)


async def usage(
    db: asyncpg.Pool, tenant_id: str, start: date, end: date, group_by: GroupBy
) -> UsageReport:
    column = GROUP_COLUMNS[group_by]
    args: list[object] = [tenant_id, start, end]
    if group_by != "day":
        args += whole_weeks(start, end)
    async with db.acquire() as conn:
        sums = await conn.fetch(_SUMS.format(column=column), tenant_id, start, end)
        histograms = await conn.fetch(histogram_sql(group_by), *args)
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
    # Percentiles are ranked here, not in SQL: a few hundred short arrays sum and rank in a
    # couple of milliseconds, where Postgres had to aggregate tens of thousands of bucket rows.
    per_group: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    per_figure: dict[str, list[list[int]]] = defaultdict(list)
    for grp, figure_name, counts in histograms:
        per_group[(grp, figure_name)].append(counts)
        per_figure[figure_name].append(counts)
    for (grp, figure_name), parts in per_group.items():
        row = rows.setdefault(grp, UsageRow(grp))
        _set_percentiles(row.figure(figure_name), _sum_histograms(parts))
    for figure_name, parts in per_figure.items():
        _set_percentiles(totals.figure(figure_name), _sum_histograms(parts))
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
        # What encode_cursor wrote: an aware time Postgres holds, a printable meeting id.
        when = datetime.fromisoformat(at).astimezone(UTC)
        if not key.isprintable() or len(key) > 200:
            raise ValueError(key)
        return when, key
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise BadCursor("the page cursor is not valid") from None


def day_bounds(start: date, end: date) -> tuple[datetime, datetime]:
    """Instants holding every visit filed on start..end: a visit's day is its local day, and
    local days run from 14 h before to 12 h after the UTC day (UTC+14 to UTC-12). They let the
    index on report_at bound the scan; report_day decides."""
    return (
        datetime.combine(start - timedelta(days=1), time(), UTC),
        datetime.combine(end + timedelta(days=2), time(), UTC),
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
        " AND report_at >= $2 AND report_at < $3 AND report_day BETWEEN $7 AND $8"
        " AND (report_at, appointment_key) < ($4, $5)"
        " ORDER BY report_at DESC, appointment_key DESC LIMIT $6",
        tenant_id,
        low,
        high,
        top_at,
        top_key,
        limit + 1,
        start,
        end,
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

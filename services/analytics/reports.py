"""The report queries. Every one takes the tenant id first and filters on it: a signed-in
admin only ever reads their own organisation's figures.

Usage figures come from the daily rollup (a 90-day report reads a few thousand rows, however
many visits there were); the per-meeting list pages through the facts with a keyset cursor.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal

from services.analytics.histogram import percentile_ms

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
    """Counts and bucket counts of one figure (lobby wait or duration) over a group."""

    count: int = 0
    sum_ms: int = 0
    buckets: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, other: Figure) -> None:
        self.count += other.count
        self.sum_ms += other.sum_ms
        for bucket, n in other.buckets.items():
            self.buckets[bucket] += n

    def summary(self) -> dict[str, float | int | None]:
        def seconds(ms: float | None) -> float | None:
            return None if ms is None else round(ms / 1000, 1)

        return {
            "count": self.count,
            "mean": seconds(self.sum_ms / self.count) if self.count else None,
            "median": seconds(percentile_ms(self.buckets, 0.5)),
            "p90": seconds(percentile_ms(self.buckets, 0.9)),
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

    def add(self, other: UsageRow) -> None:
        self.appointments += other.appointments
        self.completed += other.completed
        self.no_show += other.no_show
        self.sms_sent += other.sms_sent
        self.lobby_wait.add(other.lobby_wait)
        self.duration.add(other.duration)

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


async def usage(
    db: asyncpg.Pool, tenant_id: str, start: date, end: date, group_by: GroupBy
) -> UsageReport:
    column = GROUP_COLUMNS[group_by]
    async with db.acquire() as conn:
        sums = await conn.fetch(
            f"SELECT {column} AS grp, sum(visits)::bigint AS visits,"  # noqa: S608 (fixed map)
            " sum(completed)::bigint AS completed, sum(no_show)::bigint AS no_show,"
            " sum(sms_sent)::bigint AS sms_sent, sum(lobby_wait_count)::bigint AS lw_count,"
            " sum(lobby_wait_sum_ms)::bigint AS lw_sum, sum(duration_count)::bigint AS d_count,"
            " sum(duration_sum_ms)::bigint AS d_sum FROM daily_usage"
            " WHERE tenant_id = $1 AND day BETWEEN $2 AND $3 GROUP BY grp",
            tenant_id,
            start,
            end,
        )
        # Per day, the tenant-level histograms hold the same counts in far fewer rows.
        source = "tenant_day_histograms" if group_by == "day" else "daily_histograms"
        buckets = await conn.fetch(
            f"SELECT {column} AS grp, figure, bucket, sum(visits)::bigint AS n"  # noqa: S608
            f" FROM {source} WHERE tenant_id = $1 AND day BETWEEN $2 AND $3"
            " GROUP BY 1, 2, 3 HAVING sum(visits) <> 0",
            tenant_id,
            start,
            end,
        )
    rows: dict[str, UsageRow] = {}
    if group_by == "day":
        days = [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]
        rows = {day: UsageRow(day) for day in days}
    for r in sums:
        row = rows.setdefault(r["grp"], UsageRow(r["grp"]))
        row.appointments, row.completed, row.no_show = r["visits"], r["completed"], r["no_show"]
        row.sms_sent = r["sms_sent"]
        row.lobby_wait.count, row.lobby_wait.sum_ms = r["lw_count"], r["lw_sum"]
        row.duration.count, row.duration.sum_ms = r["d_count"], r["d_sum"]
    for r in buckets:
        row = rows.setdefault(r["grp"], UsageRow(r["grp"]))
        figure = row.lobby_wait if r["figure"] == "lobby_wait" else row.duration
        figure.buckets[r["bucket"]] += r["n"]
    ordered = [rows[k] for k in sorted(rows)]
    totals = UsageRow("total")
    for row in ordered:
        totals.add(row)
    return UsageReport(start, end, group_by, ordered, totals)


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

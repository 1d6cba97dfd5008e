"""The usage report's median and p90, ranked from the per-day, weekly and end-day histogram
tiers, equal histogram.percentile_ms over the same values, for every grouping and for random
ranges that start and end on any weekday."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import date, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.analytics import reports, rollup
from services.analytics.histogram import (
    THRESHOLDS_MS,
    bucket_of,
    percentile_ms,
    representative_ms,
)
from tests.analytics.support import Facts

FIRST = date(2026, 3, 2)  # a Monday
DAYS = 22
GROUPINGS: tuple[reports.GroupBy, ...] = ("day", "department", "environment", "integration")
DEPARTMENTS = ["Cardiology", "Dermatology", "Oncology"]
INTEGRATIONS = [uuid.UUID(int=1), uuid.UUID(int=2)]

values = st.one_of(
    st.integers(0, 4 * 3600 * 1000),
    st.sampled_from(THRESHOLDS_MS[:200]).flatmap(lambda t: st.sampled_from([t - 1, t, t + 1])),
)
visit = st.tuples(
    st.integers(0, DAYS - 1),
    st.integers(0, len(DEPARTMENTS) - 1),
    st.integers(0, len(INTEGRATIONS) - 1),
    st.one_of(st.none(), values),
    values,
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int | None, int]], date, date]:
    drawn = draw(st.lists(visit, min_size=1, max_size=100))
    start = draw(st.integers(0, DAYS - 1))
    end = draw(st.integers(start, DAYS - 1))
    return drawn, FIRST + timedelta(days=start), FIRST + timedelta(days=end)


def _group(group_by: reports.GroupBy, day: date, department: int, integration: int) -> str:
    return {
        "day": day.isoformat(),
        "department": DEPARTMENTS[department],
        "environment": "test" if department == 0 else "production",
        "integration": str(INTEGRATIONS[integration]),
    }[group_by]


async def _check(
    facts: Facts, drawn: list[tuple[int, int, int, int | None, int]], start: date, end: date
) -> None:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    expected: dict[reports.GroupBy, dict[str, dict[str, dict[int, int]]]] = {}
    async with facts.pool.acquire() as conn:
        for offset, department, integration, wait, duration in drawn:
            day = FIRST + timedelta(days=offset)
            key = (
                tenant,
                day,
                "test" if department == 0 else "production",
                DEPARTMENTS[department],
                INTEGRATIONS[integration],
            )
            async with conn.transaction():
                await rollup.apply(
                    conn, [(None, rollup.Contribution(key, True, True, 1, wait, duration))]
                )
            if not start <= day <= end:
                continue
            for group_by in GROUPINGS:
                per_group = expected.setdefault(group_by, {})
                for group in (_group(group_by, day, department, integration), "total"):
                    counts = per_group.setdefault(group, defaultdict(lambda: defaultdict(int)))
                    counts["duration"][bucket_of(duration)] += 1
                    if wait is not None:
                        counts["lobby_wait"][bucket_of(wait)] += 1
    for group_by in GROUPINGS:
        report = await reports.usage(facts.pool, tenant, start, end, group_by)
        got = {row.group: row for row in [*report.rows, report.totals]}
        for group, counts in expected.get(group_by, {}).items():
            for name in ("lobby_wait", "duration"):
                figure = getattr(got[group], name)
                for bucket, q in ((figure.median_bucket, 0.5), (figure.p90_bucket, 0.9)):
                    want = percentile_ms(counts[name], q)
                    assert (None if bucket is None else representative_ms(bucket)) == want
        for row in report.rows:
            if row.group not in expected.get(group_by, {}):
                assert (row.duration.median_bucket, row.lobby_wait.p90_bucket) == (None, None)


def test_report_percentiles_equal_the_reference_over_the_values(database_url: str) -> None:
    """Every group's and the total's median and p90 buckets equal the reference's."""
    loop = asyncio.new_event_loop()
    facts = loop.run_until_complete(Facts.open(database_url))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cases())
    def run(case: tuple[list[tuple[int, int, int, int | None, int]], date, date]) -> None:
        loop.run_until_complete(_check(facts, *case))

    try:
        run()
    finally:
        loop.run_until_complete(facts.close())
        loop.close()


def test_whole_weeks_cover_only_mondays_to_sundays_inside_the_range() -> None:
    for start_offset in range(14):
        for length in range(1, 30):
            start = FIRST + timedelta(days=start_offset)
            end = start + timedelta(days=length - 1)
            first, last = reports.whole_weeks(start, end)
            if first > last:
                # No Monday-to-Sunday week fits: everything comes from the daily tier.
                assert length < 13
                assert (first, last) == (end + timedelta(days=1), end)
                continue
            assert first.weekday() == 0
            assert last.weekday() == 6
            assert start <= first
            assert last <= end
            # Fewer than 7 days left over at each end: no whole week is missed.
            assert (first - start).days < 7
            assert (end - last).days < 7

"""The report API: usage (JSON or CSV), the per-meeting list (paged; CSV is the whole range)
and the monthly allocation. Every handler first asks portal_auth for a principal allowed to
view reports, then queries with that principal's tenant id only."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from typing import Any, cast, get_args

import orjson
from aiohttp import web

from libs.common.portal_auth import require_principal
from libs.common.web import DB_POOL, SETTINGS, whole_number
from services.analytics import reports
from services.analytics.histogram import RELATIVE_ERROR
from services.analytics.settings import AnalyticsSettings

RANGES_DAYS = (7, 30, 90)
ACCURACY = (
    f"mean exact; median and p90 are nearest-rank values within {RELATIVE_ERROR:.1%}"
    " (0.5 s below one second)"
)
CSV_EXPORT_CHUNK = 1000
# A 90-day window, its day after and its month must stay inside the calendar.
EARLIEST_DAY = date(1970, 1, 1)
LATEST_DAY = date(9000, 12, 31)


def settings_of(request: web.Request) -> AnalyticsSettings:
    settings = request.app[SETTINGS]
    assert isinstance(settings, AnalyticsSettings)
    return settings


def bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=orjson.dumps({"error": message}).decode(), content_type="application/json"
    )


def today(request: web.Request) -> date:
    """Today where the hospital is: a range "ending today" or "this month" must not move to
    tomorrow at 18:00 in Chicago (visits are filed on their local days, facts.py)."""
    return datetime.now(settings_of(request).report_zone).date()


def _parse_day(request: web.Request, name: str) -> date | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise bad_request(f"{name} must be a date like 2026-01-31") from None
    if not EARLIEST_DAY <= day <= LATEST_DAY:
        raise bad_request(f"{name} must be between {EARLIEST_DAY} and {LATEST_DAY}")
    return day


def days_of(request: web.Request) -> int:
    days = whole_number(request.query.get("days", "30"), 6)
    if days not in RANGES_DAYS:
        raise bad_request("days must be 7, 30 or 90")
    return days


def date_range(request: web.Request) -> tuple[date, date]:
    """`from`/`to` (inclusive days, each visit's local day), or `days` (7, 30 or 90) ending
    today."""
    start, end = _parse_day(request, "from"), _parse_day(request, "to")
    if start is None or end is None:
        span = timedelta(days=days_of(request) - 1)
        if start is not None:
            end = start + span
        else:
            end = end or today(request)
            start = end - span
    if start > end:
        raise bad_request("from must not be after to")
    if (end - start).days + 1 > settings_of(request).report_max_days:
        raise bad_request(f"a report covers at most {settings_of(request).report_max_days} days")
    return start, end


def wants_csv(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt is not None:
        if fmt not in ("json", "csv"):
            raise bad_request("format must be json or csv")
        return fmt == "csv"
    accept = request.headers.get("Accept", "")
    return "text/csv" in accept and "application/json" not in accept


def csv_cell(value: object) -> object:
    # A department named "=HYPERLINK(...)" must stay text when the CSV opens in a spreadsheet.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return out.getvalue()


def csv_response(body: str, filename: str) -> web.Response:
    return web.Response(
        text=body,
        content_type="text/csv",
        charset="utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        },
    )


def json_response(body: dict[str, Any]) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


USAGE_CSV_HEADER = (
    "appointments",
    "completed",
    "no_show",
    "lobby_wait_mean_s",
    "lobby_wait_median_s",
    "lobby_wait_p90_s",
    "duration_mean_s",
    "duration_median_s",
    "duration_p90_s",
    "sms_sent",
)


def usage_csv(report: reports.UsageReport) -> str:
    def line(row: reports.UsageRow) -> list[object]:
        wait, duration = row.lobby_wait.summary(), row.duration.summary()
        return [
            row.group,
            row.appointments,
            row.completed,
            row.no_show,
            wait["mean"],
            wait["median"],
            wait["p90"],
            duration["mean"],
            duration["median"],
            duration["p90"],
            row.sms_sent,
        ]

    return csv_text(
        (report.group_by, *USAGE_CSV_HEADER), [*map(line, report.rows), line(report.totals)]
    )


async def usage_report(request: web.Request) -> web.Response:
    principal = await require_principal(request, "view_reports")
    start, end = date_range(request)
    group_by = request.query.get("group_by", "day")
    if group_by not in get_args(reports.GroupBy):
        raise bad_request("group_by must be day, department, environment or integration")
    report = await reports.usage(
        request.app[DB_POOL], principal.tenant_id, start, end, cast(reports.GroupBy, group_by)
    )
    if wants_csv(request):
        return csv_response(usage_csv(report), f"usage-{start}-{end}-by-{group_by}.csv")
    return json_response(
        {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "group_by": group_by,
            "rows": [row.as_json() for row in report.rows],
            "totals": report.totals.as_json(),
            "accuracy": ACCURACY,
        }
    )


MEETINGS_CSV_HEADER = (
    "start_time",
    "meeting_id",
    "lobby_wait_s",
    "duration_s",
    "status",
    "attendees",
    "department",
    "environment",
    "sms_sent",
)


def meeting_cells(m: reports.Meeting) -> list[object]:
    j = m.as_json()
    return [j[name] for name in MEETINGS_CSV_HEADER]


async def meetings_report(request: web.Request) -> web.Response:
    principal = await require_principal(request, "view_reports")
    start, end = date_range(request)
    pool, settings = request.app[DB_POOL], settings_of(request)
    if wants_csv(request):
        rows: list[list[object]] = []
        after: tuple[datetime, str] | None = None
        while True:
            page, cursor = await reports.meetings(
                pool, principal.tenant_id, start, end, CSV_EXPORT_CHUNK, after
            )
            rows += map(meeting_cells, page)
            if cursor is None:
                break
            after = reports.decode_cursor(cursor)
        return csv_response(csv_text(MEETINGS_CSV_HEADER, rows), f"meetings-{start}-{end}.csv")
    limit = whole_number(request.query.get("limit", str(settings.meetings_page_size)), 6)
    if limit is None or not 1 <= limit <= settings.meetings_page_size:
        raise bad_request(f"limit must be between 1 and {settings.meetings_page_size}")
    cursor_text = request.query.get("cursor")
    try:
        after = reports.decode_cursor(cursor_text) if cursor_text else None
    except reports.BadCursor as exc:
        raise bad_request(str(exc)) from None
    page, next_cursor = await reports.meetings(pool, principal.tenant_id, start, end, limit, after)
    return json_response(
        {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "meetings": [m.as_json() for m in page],
            "next_cursor": next_cursor,
        }
    )


async def allocation_report(request: web.Request) -> web.Response:
    principal = await require_principal(request, "view_reports")
    month_text = request.query.get("month")
    try:
        month = date.fromisoformat(f"{month_text}-01") if month_text else today(request)
    except ValueError:
        raise bad_request("month must look like 2026-01") from None
    if not EARLIEST_DAY <= month <= LATEST_DAY:
        raise bad_request(f"month must be between {EARLIEST_DAY:%Y-%m} and {LATEST_DAY:%Y-%m}")
    result = await reports.allocation(request.app[DB_POOL], principal.tenant_id, month)
    return json_response(result.as_json())


def add_api_routes(app: web.Application) -> None:
    app.router.add_get("/reports/usage", usage_report)
    app.router.add_get("/reports/meetings", meetings_report)
    app.router.add_get("/reports/allocation", allocation_report)

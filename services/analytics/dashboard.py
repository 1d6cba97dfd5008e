"""The usage dashboard: one server-rendered page with SVG charts, the meetings table and CSV
links. It needs no script, so the strict content security policy holds."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import jinja2
from aiohttp import web
from markupsafe import Markup

from libs.common.portal_auth import require_principal
from libs.common.web import DB_POOL
from services.analytics import reports
from services.analytics.api import ACCURACY, RANGES_DAYS, bad_request, days_of, today
from services.analytics.charts import bar_chart, line_chart

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
)


def duration_text(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


TEMPLATES.filters["dur"] = duration_text


def _minutes(figure: reports.Figure) -> float | None:
    return figure.sum_ms / figure.count / 60_000 if figure.count else None


async def dashboard(request: web.Request) -> web.Response:
    principal = await require_principal(request, "view_reports")
    days = days_of(request)
    end = today(request)
    start = end - timedelta(days=days - 1)
    pool = request.app[DB_POOL]
    usage = await reports.usage(pool, principal.tenant_id, start, end, "day")
    cursor_text = request.query.get("cursor")
    try:
        after = reports.decode_cursor(cursor_text) if cursor_text else None
    except reports.BadCursor as exc:
        raise bad_request(str(exc)) from None
    meetings, next_cursor = await reports.meetings(pool, principal.tenant_id, start, end, 50, after)
    allocation = await reports.allocation(pool, principal.tenant_id, end)
    page = TEMPLATES.get_template("dashboard.html").render(
        upn=principal.upn,
        csrf_token=principal.csrf_token,
        ranges=RANGES_DAYS,
        days=days,
        start=start,
        end=end,
        allocation=allocation.as_json(),
        totals=usage.totals.as_json(),
        appointments_chart=Markup(  # noqa: S704 (built with escape() throughout)
            bar_chart(
                "chart-appointments",
                "Appointments per day",
                [(r.group, float(r.appointments)) for r in usage.rows],
            )
        ),
        duration_chart=Markup(  # noqa: S704
            line_chart(
                "chart-duration",
                "Average duration per day, minutes",
                [(r.group, _minutes(r.duration)) for r in usage.rows],
            )
        ),
        lobby_chart=Markup(  # noqa: S704
            line_chart(
                "chart-lobby-wait",
                "Average lobby wait per day, minutes",
                [(r.group, _minutes(r.lobby_wait)) for r in usage.rows],
            )
        ),
        meetings=[m.as_json() for m in meetings],
        next_cursor=next_cursor,
        accuracy=ACCURACY,
    )
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


async def home(_request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard")


def add_dashboard_routes(app: web.Application) -> None:
    app.router.add_get("/", home)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_static("/static", Path(__file__).parent / "static", append_version=False)

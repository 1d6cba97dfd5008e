"""The report API on real Postgres behind the real portal sign-in: roles, tenant scoping,
usage as JSON and CSV, the paged meeting list and the allocation."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta

from libs.common.events import TenantSettingsV1, Topic, make_event
from sandbox.microsoft.directory import CONTOSO_TENANT, FABRIKAM_TENANT
from tests.analytics.conftest import (
    CONTOSO_ADMIN,
    CONTOSO_READER,
    CONTOSO_REPORTS,
    FABRIKAM_ADMIN,
    Analytics,
)
from tests.analytics.visits import Person, Visit, events

DAY = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
RANGE = "from=2026-03-09&to=2026-03-11"


def visit(
    start: datetime,
    *,
    patient: bool = True,
    wait_min: float = 2,
    minutes: float = 20,
    department: str = "Cardiology",
    tenant: str = CONTOSO_TENANT,
) -> Visit:
    dr = Person("dr", "organizer", None, [(start, start + timedelta(minutes=minutes))])
    people = [dr]
    if patient:
        admitted = start + timedelta(minutes=1)
        people.append(
            Person(
                "pt",
                "patient",
                admitted - timedelta(minutes=wait_min),
                [(admitted, start + timedelta(minutes=minutes))],
            )
        )
    return Visit(
        key=f"apt-{uuid.uuid4().hex}",
        tenant_id=tenant,
        department=department,
        environment="production",
        people=people,
        ended_at=start + timedelta(minutes=minutes),
        sms_sent=1,
    )


async def seed(analytics: Analytics, *visits: Visit) -> None:
    for v in visits:
        for event in events(v):
            await analytics.facts.apply(event)


async def test_signed_out_callers_are_refused(analytics: Analytics) -> None:
    """No session: the API answers 401 JSON and the dashboard redirects to sign-in."""
    status, body, _ = await analytics.get(None, f"/reports/usage?{RANGE}")
    assert (status, body) == (401, {"error": "sign in required"})
    status, _, response = await analytics.get(None, "/dashboard", {"Accept": "text/html"})
    assert status == 302
    assert response.headers["Location"].startswith("/auth/login")


async def test_report_roles_and_tenant_scoping(analytics: Analytics) -> None:
    """Global Administrator, Global Reader and Reports Reader see their own tenant's
    figures; another tenant's admin sees none of them."""
    await seed(analytics, visit(DAY), visit(DAY + timedelta(hours=2), patient=False))
    await seed(analytics, visit(DAY, tenant=FABRIKAM_TENANT, department="Oncology"))
    for upn in (CONTOSO_ADMIN, CONTOSO_READER, CONTOSO_REPORTS):
        status, body, _ = await analytics.get(upn, f"/reports/usage?{RANGE}&group_by=department")
        assert status == 200, body
        assert [(r["group"], r["appointments"]) for r in body["rows"]] == [("Cardiology", 2)]
    status, body, _ = await analytics.get(
        FABRIKAM_ADMIN, f"/reports/usage?{RANGE}&group_by=department"
    )
    assert [(r["group"], r["appointments"]) for r in body["rows"]] == [("Oncology", 1)]


async def test_usage_by_day_with_statistics_and_csv(analytics: Analytics) -> None:
    """Per-day rows carry counts, mean/median/p90 and SMS; the CSV has the same figures."""
    await seed(
        analytics,
        visit(DAY, wait_min=2, minutes=20),
        visit(DAY + timedelta(hours=1), wait_min=4, minutes=30),
        visit(DAY + timedelta(hours=3), patient=False, minutes=10),
    )
    status, body, _ = await analytics.get(CONTOSO_REPORTS, f"/reports/usage?{RANGE}&group_by=day")
    assert status == 200
    assert [r["group"] for r in body["rows"]] == ["2026-03-09", "2026-03-10", "2026-03-11"]
    day = body["rows"][1]
    assert (day["appointments"], day["completed"], day["no_show"], day["sms_sent"]) == (3, 2, 1, 3)
    assert day["lobby_wait_s"]["mean"] == 180.0
    assert day["lobby_wait_s"]["count"] == 2
    # Durations 19, 29 min (from admission) and 0 (no show): mean exact, percentiles bucketed.
    assert day["duration_s"]["mean"] == round((19 + 29) * 60 / 3, 1)
    assert abs(day["duration_s"]["median"] - 19 * 60) <= 19 * 60 * 0.026
    assert abs(day["duration_s"]["p90"] - 29 * 60) <= 29 * 60 * 0.026
    assert body["rows"][0]["appointments"] == 0

    status, text, response = await analytics.get(
        CONTOSO_REPORTS, f"/reports/usage?{RANGE}&format=csv"
    )
    assert status == 200
    assert response.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[1]["day"] == "2026-03-10"
    assert (rows[1]["appointments"], rows[1]["no_show"], rows[1]["lobby_wait_mean_s"]) == (
        "3",
        "1",
        "180.0",
    )
    assert rows[-1]["day"] == "total"
    status, text, _ = await analytics.get(
        CONTOSO_REPORTS, f"/reports/usage?{RANGE}", {"Accept": "text/csv"}
    )
    assert text.startswith("day,appointments,")


async def test_group_by_integration_and_environment(analytics: Analytics) -> None:
    """The same figures group by integration and environment."""
    await seed(analytics, visit(DAY), visit(DAY, department="Dermatology"))
    for group_by, group in (
        ("integration", "0b9a4c1e-2f3d-4e5a-8b6c-7d8e9f0a1b2c"),
        ("environment", "production"),
    ):
        _, body, _ = await analytics.get(
            CONTOSO_REPORTS, f"/reports/usage?{RANGE}&group_by={group_by}"
        )
        assert [(r["group"], r["appointments"]) for r in body["rows"]] == [(group, 2)]


async def test_meetings_page_through_every_visit_once(analytics: Analytics) -> None:
    """Five visits, two per page: three pages, newest first, none twice; CSV has all five."""
    seeded = [visit(DAY + timedelta(minutes=30 * i)) for i in range(5)]
    await seed(analytics, *seeded)
    seen: list[str] = []
    cursor = ""
    for _ in range(3):
        status, body, _ = await analytics.get(
            CONTOSO_REPORTS, f"/reports/meetings?{RANGE}&limit=2{cursor}"
        )
        assert status == 200
        seen += [m["meeting_id"] for m in body["meetings"]]
        cursor = f"&cursor={body['next_cursor']}" if body["next_cursor"] else ""
    assert cursor == ""
    assert seen == [v.key for v in reversed(seeded)]
    first = body["meetings"][-1]
    assert (first["status"], first["attendees"], first["department"], first["sms_sent"]) == (
        "Completed",
        2,
        "Cardiology",
        1,
    )
    assert first["lobby_wait_s"] == 120.0
    assert first["duration_s"] == 19 * 60.0
    _, text, _ = await analytics.get(CONTOSO_REPORTS, f"/reports/meetings?{RANGE}&format=csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["meeting_id"] for r in rows] == seen
    status, body, _ = await analytics.get(CONTOSO_REPORTS, f"/reports/meetings?{RANGE}&cursor=%%%")
    assert status == 400


async def test_allocation_follows_tenant_settings(analytics: Analytics) -> None:
    """Without settings the allocation is "not set"; with them, remaining and exceeded follow,
    and an older config version replayed never wins."""
    now = analytics.local_noon()
    await seed(analytics, visit(now), visit(now + timedelta(minutes=40)))
    _, body, _ = await analytics.get(CONTOSO_REPORTS, "/reports/allocation")
    assert body["completed_appointments"] == 2
    assert body["remaining_allocation"] == "not set"
    assert body["exceeded_limit"] == "not set"
    for version, allocation in ((2, 1), (1, 100)):
        settings = TenantSettingsV1(monthly_allocation=allocation, config_version=version)
        await analytics.facts.apply(
            make_event(Topic.TENANT_SETTINGS, CONTOSO_TENANT, CONTOSO_TENANT, settings)
        )
    _, body, _ = await analytics.get(CONTOSO_REPORTS, "/reports/allocation")
    assert (body["monthly_allocation"], body["remaining_allocation"]) == (1, 0)
    assert (body["exceeded_limit"], body["exceeded_by"]) == (True, 1)


async def test_bad_parameters_are_refused(analytics: Analytics) -> None:
    """Unknown group, reversed range, too long a range, bad days: 400 with a reason."""
    for query in (
        f"{RANGE}&group_by=patient",
        "from=2026-03-11&to=2026-03-09",
        "from=2020-01-01&to=2026-01-01",
        "days=12",
        "from=yesterday&to=2026-01-01",
    ):
        status, body, _ = await analytics.get(CONTOSO_REPORTS, f"/reports/usage?{query}")
        assert status == 400, query
        assert "error" in body

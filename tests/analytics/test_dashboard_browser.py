"""The dashboard in real headless Chromium: charts and table show the seeded figures."""

from __future__ import annotations

from datetime import timedelta

from tests.analytics.conftest import CONTOSO_REPORTS, Analytics
from tests.analytics.test_reports_api import seed, visit
from tests.support.browser import chromium


async def test_dashboard_shows_seeded_figures_in_charts_and_table(analytics: Analytics) -> None:
    """Seven-day view: per-day bars, average duration and lobby-wait points, totals, the
    meeting table and CSV links match what was seeded; a screenshot is saved."""
    today = analytics.local_noon()
    two_days_ago = today - timedelta(days=2)
    seeded = [
        visit(today, wait_min=2, minutes=21),
        visit(today + timedelta(minutes=30), wait_min=4, minutes=31),
        visit(two_days_ago, wait_min=1, minutes=11),
        visit(two_days_ago + timedelta(hours=1), patient=False, minutes=5),
    ]
    await seed(analytics, *seeded)
    session = await analytics.session(CONTOSO_REPORTS)
    async with chromium() as page:
        await page.send(
            "Network.setCookie", name="portal_session", value=session.cookie, url=analytics.url
        )
        await page.goto(f"{analytics.url}/dashboard?days=7")
        bars = await page.evaluate(
            "[...document.querySelectorAll('#chart-appointments rect.mark')]"
            ".map(r => [r.dataset.day, r.dataset.value])"
        )
        assert len(bars) == 7
        assert dict(bars)[today.date().isoformat()] == "2"
        assert dict(bars)[two_days_ago.date().isoformat()] == "2"
        # Average duration per day in minutes: (20 + 30) / 2 today; (10 + 0) / 2 before.
        durations = dict(
            await page.evaluate(
                "[...document.querySelectorAll('#chart-duration circle.mark')]"
                ".map(c => [c.dataset.day, c.dataset.value])"
            )
        )
        assert durations == {today.date().isoformat(): "25", two_days_ago.date().isoformat(): "5"}
        waits = dict(
            await page.evaluate(
                "[...document.querySelectorAll('#chart-lobby-wait circle.mark')]"
                ".map(c => [c.dataset.day, c.dataset.value])"
            )
        )
        assert waits == {today.date().isoformat(): "3", two_days_ago.date().isoformat(): "1"}
        rows = await page.evaluate(
            "[...document.querySelectorAll('#meetings tbody tr')]"
            ".map(tr => [...tr.cells].map(td => td.textContent))"
        )
        assert [r[1] for r in rows] == [seeded[i].key for i in (1, 0, 3, 2)]
        newest = next(r for r in rows if r[1] == seeded[1].key)
        assert newest[2:] == ["4 min 0 s", "30 min 0 s", "Completed", "2", "Cardiology", "1"]
        no_show = next(r for r in rows if r[1] == seeded[3].key)
        assert no_show[4] == "No show"
        assert (
            await page.evaluate("document.querySelector('#total-appointments').textContent") == "4"
        )
        assert await page.evaluate("document.querySelector('#alloc-remaining').textContent") == (
            "not set"
        )
        href = await page.evaluate("document.querySelector('#meetings-csv').getAttribute('href')")
        assert "format=csv" in href
        await page.screenshot("analytics/dashboard-7-days")

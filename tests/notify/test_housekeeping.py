"""Notify's housekeeper deletes delivery reports once they can neither record a lost send nor
dedupe a redelivery: otherwise one row per SMS stays for as long as the service runs."""

from __future__ import annotations

from datetime import timedelta

from libs.common.web import HOUSEKEEPER
from tests.conftest import wait_for
from tests.notify.conftest import MakeKit

_REPORT = (
    "INSERT INTO delivery_reports (provider_message_id, delivery_status, details, received_at,"
    " event_id) VALUES ($1, 'Delivered', 'ok', now() - $2::interval, $1)"
)


async def test_delivery_reports_older_than_the_retention_are_deleted(make_kit: MakeKit) -> None:
    """A report received 46 days ago goes; one received 44 days ago stays."""
    kit = await make_kit(scheduler_enabled=False)
    # The service's own first round (at start) is over: the sweep below is the only one.
    await wait_for(kit.app[HOUSEKEEPER].round_done, "the first housekeeping round")
    await kit.pool.execute(_REPORT, "old-report", timedelta(days=46))
    await kit.pool.execute(_REPORT, "recent-report", timedelta(days=44))
    swept = await kit.app[HOUSEKEEPER].sweep()
    assert swept["delivery_reports"] == 1
    rows = await kit.query("SELECT provider_message_id FROM delivery_reports")
    assert [r["provider_message_id"] for r in rows] == ["recent-report"]

"""A STOP or START carries ACS's ReceivedTimestamp, and the later word wins. Found by a
review: a STOP stamped far in the future (a skewed clock, or any time within the event
years) could never be lifted by the patient's START."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.notify import optout
from tests.notify.conftest import PATIENT, SENDER, MakeKit


async def test_a_stop_stamped_in_the_future_is_still_lifted_by_a_later_start(
    make_kit: MakeKit,
) -> None:
    """A STOP stamped in 8999 counts as received when it arrived, so the START that follows
    lifts it; a START stamped before that STOP arrived still does not."""
    kit = await make_kit(scheduler_enabled=False)
    secret = "opt-out-hash-secret-for-this-test"
    future = datetime(8999, 1, 1, tzinfo=UTC)
    async with kit.pool.acquire() as conn:
        assert await optout.apply(conn, secret, SENDER, PATIENT, "stop", future)
        past = datetime.now(UTC) - timedelta(minutes=1)
        assert not await optout.apply(conn, secret, SENDER, PATIENT, "start", past)
        assert await optout.apply(conn, secret, SENDER, PATIENT, "start", datetime.now(UTC))
        opted_out = await conn.fetchval("SELECT opted_out FROM opt_outs")
    assert opted_out is False

"""ACS's Retry-After is honoured up to the longest backoff. Found by a review: an answer
asking for 10**9 s parked the message for 31 years, past its visit, and inf overflowed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from services.notify.acs import AcsSmsClient, SendResult
from tests.notify.conftest import MakeKit


@pytest.mark.parametrize("asked_s", [1e9, float("inf")])
async def test_a_huge_retry_after_waits_the_longest_backoff_at_most(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch, asked_s: float
) -> None:
    """A 429 asking to wait 10**9 s or forever is retried within sms_backoff_max_s."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book("apt_retry_after", starts_in=timedelta(days=2))

    async def throttled(client: AcsSmsClient, **kwargs: Any) -> SendResult:
        return SendResult(status=429, error_code="TooManyRequests", retry_after_s=asked_s)

    monkeypatch.setattr(AcsSmsClient, "send", throttled)
    asked_at = kit.clock.now()
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("confirmation") == ["retry"]
    [row] = await kit.query("SELECT due_at FROM sms_messages WHERE kind = 'confirmation'")
    assert row["due_at"] <= asked_at + timedelta(seconds=kit.settings.sms_backoff_max_s + 1)

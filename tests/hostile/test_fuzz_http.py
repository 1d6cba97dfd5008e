"""Schemathesis against every service's HTTP API, on a real port with real Kafka and
Postgres: generated requests, valid and invalid, signed out and signed in. No answer is a 5xx,
every answer matches the OpenAPI document, and the service logs no error while answering."""

from __future__ import annotations

import pytest

from tests.hostile.http_support import (
    Budget,
    Target,
    analytics_target,
    config_target,
    fuzz,
    launch_target,
    notify_target,
    report,
    watching_logs,
)

__all__ = ["analytics_target", "config_target", "launch_target", "notify_target"]

BUDGET = Budget(signed_out=3, positive=20, negative=10)
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")


async def _fuzz_both_ways(target: Target) -> None:
    with watching_logs() as logs:
        findings = await fuzz(target, signed_in=False, budget=BUDGET, logs=logs)
        findings += await fuzz(target, signed_in=True, budget=BUDGET, logs=logs)
        assert not findings, report(findings)
        assert not logs.errors(), logs.errors()


async def test_config_api_survives_fuzzing(config_target: Target) -> None:
    """Config: no generated request gets a 5xx, an undocumented answer or an error log."""
    await _fuzz_both_ways(config_target)


async def test_launch_gateway_survives_fuzzing(launch_target: Target) -> None:
    """Launch: no generated request gets a 5xx, an undocumented answer or an error log."""
    await _fuzz_both_ways(launch_target)


async def test_notify_webhook_survives_fuzzing(notify_target: Target) -> None:
    """Notify: no generated request gets a 5xx, an undocumented answer or an error log."""
    await _fuzz_both_ways(notify_target)


async def test_analytics_api_survives_fuzzing(analytics_target: Target) -> None:
    """Analytics: no generated request gets a 5xx, an undocumented answer or an error log."""
    await _fuzz_both_ways(analytics_target)

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from libs.common.portal_auth import PortalSettings


class AnalyticsSettings(PortalSettings):
    service_name: ClassVar[str] = "analytics"

    http_port: int = Field(default=8083, ge=0, le=65535)
    public_base_url: str = "http://127.0.0.1:8083"

    # Longest range one usage report may cover; the rollup makes even a year cheap.
    report_max_days: int = Field(default=366, ge=1, le=3660)
    # Rows per page of the per-meeting report, unless the request asks for fewer.
    meetings_page_size: int = Field(default=50, ge=1, le=1000)
    # Events per poll: the projector applies a poll in a fixed number of statements, so a
    # larger poll is cheaper per event (see docs/performance.md); a quiet stream polls less.
    consumer_batch_size: int = Field(default=500, ge=1, le=5000)
    # Figures may lag their events by this much (the issue allows seconds), so under a steady
    # stream a poll carries up to half a second of events rather than the two or three that
    # arrived since the last one: at 100 bookings a second, polls of ~100 events instead of
    # ~6, and a sixth of the statements per event (docs/performance.md).
    consumer_fetch_min_bytes: int = Field(default=1_048_576, ge=1, le=52_428_800)
    # The longest a poll waits to fill: what the figures may lag a steady stream by.
    consumer_fetch_max_wait_ms: int = Field(default=500, ge=0, le=5_000)
    # Distinct department label values per process before the rest share "other".
    metrics_department_limit: int = Field(default=100, ge=1, le=1000)

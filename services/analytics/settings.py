from __future__ import annotations

from typing import ClassVar
from zoneinfo import ZoneInfo

from pydantic import Field, field_validator

from libs.common.portal_auth import PortalSettings

DEFAULT_REPORT_TIME_ZONE = "America/Chicago"


def known_zone(name: str | None) -> ZoneInfo | None:
    """The IANA time zone of that name, or None when there is none (a booking's zone is a
    free string)."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError):
        # ZoneInfoNotFoundError is a KeyError; a malformed key is a ValueError, a directory
        # of the tz database (e.g. "America") an OSError.
        return None


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
    # A poll's statements name hundreds of appointments in arrays. A generic plan, made while
    # the tables were small or before they were analysed, scanned every observation table
    # whole for each poll (49 ms a poll against 4 ms planned for its keys; docs/performance.md,
    # tenth pass), and stays cached until autovacuum next analyses them.
    database_custom_plans: bool = True
    # Figures may lag their events by this much (the issue allows seconds), so under a steady
    # stream a poll carries up to half a second of events rather than the two or three that
    # arrived since the last one: at 100 bookings a second, polls of ~100 events instead of
    # ~6, and a sixth of the statements per event (docs/performance.md).
    consumer_fetch_min_bytes: int = Field(default=1_048_576, ge=1, le=52_428_800)
    # The longest a poll waits to fill: what the figures may lag a steady stream by.
    consumer_fetch_max_wait_ms: int = Field(default=500, ge=0, le=5_000)
    # Distinct department label values per process before the rest share "other".
    metrics_department_limit: int = Field(default=100, ge=1, le=1000)
    # IANA time zone of the reports' "today" (the end of a 7-, 30- or 90-day range and the
    # allocation's current month), and of the days of visits whose booking gave no usable zone;
    # every other visit counts on its own local day. Like launch's default_time_zone.
    report_time_zone: str = DEFAULT_REPORT_TIME_ZONE

    @field_validator("report_time_zone")
    @classmethod
    def _a_known_zone(cls, value: str) -> str:
        if known_zone(value) is None:
            raise ValueError(f"{value!r} is not an IANA time zone")
        return value

    def migration_parameters(self) -> dict[str, str]:
        # 0007 files past visits, whose zones were not kept, in this zone.
        return {"report_time_zone": self.report_time_zone}

    @property
    def report_zone(self) -> ZoneInfo:
        return ZoneInfo(self.report_time_zone)  # known: checked by the validator

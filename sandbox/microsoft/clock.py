"""Injectable clocks and the timestamp formats used by Graph, Entra and ACS."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Protocol


class Clock(Protocol):
    """Source of the current UTC time."""

    def now(self) -> datetime: ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that only moves when told to (tests, demos)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 7, 14, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> datetime:
        self._now += timedelta(seconds=seconds)
        return self._now

    def set(self, when: datetime) -> None:
        self._now = when.astimezone(UTC)


def graph_time(dt: datetime) -> str:
    """Format like Graph: ``2030-01-07T14:00:00.0000000Z`` (7 fractional digits)."""
    dt = dt.astimezone(UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond:06d}0Z"


_ISO = re.compile(
    r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:?\d{2})?$", re.IGNORECASE
)


def parse_time(value: str) -> datetime:
    """Parse an ISO 8601 timestamp (any number of fractional digits); naive means UTC."""
    m = _ISO.match(value.strip())
    if not m:
        raise ValueError(f"not an ISO 8601 date-time: {value!r}")
    base, frac, zone = m.groups()
    text = base + ("." + (frac + "000000")[:6] if frac else "")
    if zone and zone.upper() != "Z":
        text += zone if ":" in zone else zone[:3] + ":" + zone[3:]
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def rfc1123(dt: datetime) -> str:
    """Format an HTTP date (``x-ms-date``)."""
    return format_datetime(dt.astimezone(UTC), usegmt=True)


def parse_rfc1123(value: str) -> datetime:
    """Parse an HTTP date; raises ValueError if malformed."""
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"not an RFC 1123 date: {value!r}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)

"""Meeting preparation gives way to bookings. A meeting is background work with a day's
slack (`meeting_lead_minutes`), while a booking's confirmation SMS is waited for: during a
burst from the scheduling feed (an EHR's morning import, a clinic moving a day's visits),
preparing every meeting at once takes the gateway's event loop and database connections,
and the Microsoft side's capacity, from the bookings. So while the feed is busy the worker
starts meetings of visits that are not urgent at a steady rate, and catches up once the
feed is quiet; a visit starting within `meeting_urgent_minutes` is never held back."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

# The feed counts as busy while it delivered an event this recently.
FEED_BUSY_WINDOW_S = 1.0


class FeedActivity:
    """When the scheduling feed last delivered an event."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = -math.inf

    def note(self) -> None:
        self._last = self._clock()

    def busy(self) -> bool:
        return self._clock() - self._last < FEED_BUSY_WINDOW_S


class Allowance:
    """A token bucket: how many meetings of visits not urgent may start now while the feed
    is busy, at `rate` a second and at most `burst` at once."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(max(1, burst))
        self._clock = clock
        self._tokens = self._burst
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now

    def has_room(self) -> bool:
        """Whether a start would be granted now (without taking it)."""
        self._refill()
        return self._tokens >= 1

    def take(self, wanted: int) -> int:
        self._refill()
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted

    def refill_s(self) -> float:
        """Seconds until one more start is allowed."""
        return max(0.0, (1.0 - self._tokens) / self._rate)


@dataclass
class MeetingPace:
    feed: FeedActivity
    allowance: Allowance


MEETING_PACE = web.AppKey("meeting_pace", MeetingPace)

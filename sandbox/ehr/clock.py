"""Injectable clocks: wall time in production, a hand-driven clock in tests."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds since the Unix epoch."""
        ...


def system_clock() -> float:
    return time.time()


class FakeClock:
    """A clock that only moves when told to (tests make codes and tokens expire with it)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

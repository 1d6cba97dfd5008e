"""The JWT NumericDate rule both stand-ins check their tokens' times with."""

from __future__ import annotations

import math
from typing import Any


def numeric_date(claims: dict[str, Any], name: str, absent: float | None = None) -> float | None:
    """A JWT NumericDate claim (RFC 7519: a JSON number), `absent` when missing, None when it
    is anything else: a string, a boolean, NaN or infinity would otherwise slip past a clock
    comparison (NaN compares false both ways) or crash it (float("soon"), 10**400)."""
    value = claims.get(name)
    if value is None:
        return absent
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)

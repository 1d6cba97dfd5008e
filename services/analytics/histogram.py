"""Fixed, fine buckets for lobby wait and duration, so medians and p90s come from the daily
rollup without reading a single fact.

Bucket 0 holds [0, 1 s); bucket i >= 1 holds [1.05^(i-1) s, 1.05^i s); the last bucket is
open-ended (>= about 48 h). A percentile is reported as the geometric centre of its bucket, so
it is within 2.5 % of the exact nearest-rank value (within 0.5 s below one second). The same
integer thresholds are used by Postgres' `width_bucket` in the rollup check.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

GROWTH = 1.05
LAST_THRESHOLD_MS = 48 * 3600 * 1000


def _thresholds() -> list[int]:
    bounds = [1000]
    while bounds[-1] < LAST_THRESHOLD_MS:
        bounds.append(max(bounds[-1] + 1, round(bounds[-1] * GROWTH)))
    return bounds


# Lower bounds of buckets 1..n in milliseconds; width_bucket semantics.
THRESHOLDS_MS: list[int] = _thresholds()
BUCKETS = len(THRESHOLDS_MS) + 1
# Worst relative error of a reported percentile against the exact value (geometric centre).
RELATIVE_ERROR = math.sqrt(GROWTH) - 1 + 0.001


def bucket_of(ms: int) -> int:
    return bisect.bisect_right(THRESHOLDS_MS, ms)


def representative_ms(bucket: int) -> float:
    if bucket <= 0:
        return 500.0
    low = THRESHOLDS_MS[bucket - 1]
    if bucket >= len(THRESHOLDS_MS):
        return float(low)
    return math.sqrt(low * THRESHOLDS_MS[bucket])


def percentile_bucket(counts: Sequence[int | None], q: float) -> int | None:
    """The bucket of the nearest-rank percentile (q in (0, 1]) of a dense histogram, where
    counts[i] is the number of values in bucket i (None counts as zero)."""
    total = sum(n or 0 for n in counts)
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket, n in enumerate(counts):
        seen += n or 0
        if seen >= rank:
            return bucket
    return None  # unreachable: the running sum ends at total >= rank


def percentile_ms(counts: Mapping[int, int], q: float) -> float | None:
    """Nearest-rank percentile (q in (0, 1]) of the values counted per bucket."""
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            return representative_ms(bucket)
    return representative_ms(max(counts))

"""The benchmark harness: each benchmark measures a figure and, in the same run, its
baseline; the table and bench/results/latest.json report the ratio against a goal."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "latest.json"


@dataclass(frozen=True)
class Result:
    name: str
    figure: float
    unit: str
    baseline: float
    ratio: float
    goal: str
    meets_goal: bool


@dataclass(frozen=True)
class Benchmark:
    name: str
    run: Callable[[bool], Awaitable[Result]]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def timed(fn: Callable[[], object], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return time.perf_counter() - started


def print_table(results: list[Result]) -> None:
    header = f"{'benchmark':<40} {'figure':>14} {'baseline':>14} {'ratio':>7}  {'goal':<14} ok"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<40} {r.figure:>10.1f} {r.unit:<3} {r.baseline:>10.1f} {r.unit:<3}"
            f" {r.ratio:>7.2f}  {r.goal:<14} {'yes' if r.meets_goal else 'NO'}"
        )


def write_json(results: list[Result], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")

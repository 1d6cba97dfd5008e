"""`make bench` (full) and `make bench-smoke` (tiny runs that keep the benchmarks working)."""

from __future__ import annotations

import argparse
import asyncio

from bench import analytics, codec, join, launch_cpu, notify, outbox, pipeline
from bench.harness import Benchmark, Result, print_table, write_json

BENCHMARKS = [
    Benchmark("event envelope encode+decode", codec.run),
    Benchmark("outbox relay publish", outbox.run),
    *notify.BENCHMARKS,
    *analytics.BENCHMARKS,
    *join.BENCHMARKS,
    *launch_cpu.BENCHMARKS,
    *pipeline.BENCHMARKS,
]


async def main(smoke: bool) -> list[Result]:
    results = []
    for benchmark in BENCHMARKS:
        print(f"bench: {benchmark.name}{' (smoke)' if smoke else ''}...", flush=True)
        results.append(await benchmark.run(smoke))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny runs; figures mean nothing")
    args = parser.parse_args()
    results = asyncio.run(main(args.smoke))
    print_table(results)
    if not args.smoke:
        write_json(results)

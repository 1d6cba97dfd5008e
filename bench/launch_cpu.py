"""Provider launch CPU: the launch service's own CPU time per full SMART EHR launch.

The EHR stand-in, the Microsoft stand-in and the launch service each run as a process
(`bench.system`). Each launch is what PowerChart and the clinician's browser do: the EHR
mints a launch, the browser opens `/launch/provider?iss=&launch=`, goes to the EHR's
authorize (auto-approved) and back to `/launch/callback`, where the gateway exchanges the
code, validates the id_token, reads the Encounter and Appointment, finds the visit's
meeting, records the clinician and opens the provider page.

Two systems, each measured the same way:
- meeting prepared: the visits are booked through the scheduling feed, so the meeting
  worker prepares every meeting (Graph createOrGet, the patient's join URL, a call-event
  subscription whose validation request comes back to the gateway) before the launches,
  as it does a day ahead in production. The CPU of the bookings and their preparation is
  reported per visit too.
- meeting made in the launch: visits booked without the feed, so each launch makes its
  meeting and records the appointment with appointment-created.

Figure: (utime + stime of the launch process over N launches) / N, from /proc, after a
warm-up (discovery, JWKS, the app token and TLS sessions are cached by then), minus the
process's idle CPU over the same wall time (consumer, relay and worker polling). Baseline,
same run: CPU per request of a bare aiohttp handler returning a constant, in its own
process, driven with as many requests as the launch process served during the launches.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
from yarl import URL

from bench.harness import Benchmark, Result
from bench.processes import free_port, process_cpu_s
from bench.system import BenchSystem, bench_system

GOAL_MS = 5.0
# Requests the launch process serves per launch: /launch/provider, /launch/callback, /visit,
# and the Graph subscription's validation request.
REQUESTS_PER_LAUNCH = 4

BARE_SERVER = """
import sys
from aiohttp import web

async def constant(_request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_get("/", constant)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


async def follow(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """Follows redirects like a browser, carrying cookies by hand (they are Secure)."""
    cookies: dict[str, str] = {}
    for _ in range(10):
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
        async with http.get(url, allow_redirects=False, headers=headers) as r:
            body = await r.text()
            cookies.update({name: morsel.value for name, morsel in r.cookies.items()})
            if r.status not in (301, 302, 303, 307):
                return r.status, body
            url = str(r.url.join(URL(r.headers["Location"])))
    raise RuntimeError("too many redirects")


async def book(http: aiohttp.ClientSession, system: BenchSystem, count: int) -> list[str]:
    tenant = system.tenants[0]
    base = f"{system.urls['ehr']}/_sandbox/tenants/{tenant.guid}"
    async with http.get(f"{base}/directory") as r:
        directory: dict[str, Any] = await r.json()
    start = datetime.now(UTC) + timedelta(hours=2)
    booked = []
    for i in range(count):
        body = {
            "patient": directory["patients"][i % len(directory["patients"])]["id"],
            "practitioner": directory["practitioners"][0]["id"],
            "location": directory["locations"][i % len(directory["locations"])]["id"],
            "start": (start + timedelta(minutes=i % 600)).isoformat(),
            "minutes": 20,
            "video": True,
        }
        async with http.post(f"{base}/appointments", json=body) as r:
            if r.status != 201:
                raise RuntimeError(f"booking answered {r.status}: {await r.text()}")
            booked.append(str((await r.json())["id"]))
    return booked


async def launch(http: aiohttp.ClientSession, system: BenchSystem, appointment: str) -> None:
    tenant = system.tenants[0]
    async with http.post(
        f"{system.urls['ehr']}/_sandbox/tenants/{tenant.guid}/launches",
        json={"appointment": appointment},
    ) as r:
        launch_url = (await r.json())["launch_url"]
    status, page = await follow(http, launch_url)
    if status != 200 or "Join the meeting" not in page:
        raise RuntimeError(f"the provider page answered {status}: {page[:300]}")


async def _idle_rate(pid: int) -> float:
    """CPU s per s the process spends with nothing to do (consumer and relay polling)."""
    await asyncio.sleep(0.5)
    started, cpu = time.perf_counter(), process_cpu_s(pid)
    await asyncio.sleep(2.0)
    return (process_cpu_s(pid) - cpu) / (time.perf_counter() - started)


async def _all_prepared(system: BenchSystem, count: int) -> None:
    conn = await asyncpg.connect(system.dsn)
    try:
        deadline = time.monotonic() + 120
        while (
            await conn.fetchval(
                "SELECT count(*) FROM launch.appointments WHERE meeting_id IS NOT NULL"
            )
            < count
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("meetings not prepared within 120 s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


@dataclass(frozen=True)
class LaunchCpu:
    """CPU s per launch of the launch process, and of the bookings' preparation."""

    creating: float  # every launch makes its meeting (no scheduling feed)
    prepared: float  # booked through the feed, meetings prepared before the launches
    preparation: float  # per visit: the booking webhook and the meeting's preparation
    launches: int


async def _launches_cpu(
    http: aiohttp.ClientSession, system: BenchSystem, appointments: list[str], idle_rate: float
) -> float:
    pid = system.pid("launch")
    async with system.profiling("launch"):
        started, cpu = time.perf_counter(), process_cpu_s(pid)
        for appointment in appointments:
            await launch(http, system, appointment)
        used = process_cpu_s(pid) - cpu
        elapsed = time.perf_counter() - started
    return (used - idle_rate * elapsed) / len(appointments)


def _client(system: BenchSystem) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=system.client_ssl()),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def launch_cpu(
    count: int, warmup: int, extra_env: dict[str, str] | None = None
) -> tuple[float, float]:
    """Every launch makes its meeting: (CPU s per launch, idle CPU s per s)"""
    async with (
        bench_system(
            tenants=1, services=("launch",), webhooks=False, extra_env=extra_env
        ) as system,
        _client(system) as http,
    ):
        appointments = await book(http, system, warmup + count)
        for appointment in appointments[:warmup]:
            await launch(http, system, appointment)
        idle_rate = await _idle_rate(system.pid("launch"))
        return await _launches_cpu(http, system, appointments[warmup:], idle_rate), idle_rate


async def prepared_launch_cpu(
    count: int, warmup: int, extra_env: dict[str, str] | None = None
) -> tuple[float, float]:
    """Booked through the scheduling feed, so the worker prepares every meeting before the
    launches: (CPU s per launch, CPU s per visit of the bookings and their preparation)."""
    async with (
        bench_system(tenants=1, services=("launch",), webhooks=True, extra_env=extra_env) as system,
        _client(system) as http,
    ):
        pid = system.pid("launch")
        idle_rate = await _idle_rate(pid)
        started, cpu = time.perf_counter(), process_cpu_s(pid)
        appointments = await book(http, system, warmup + count)
        await _all_prepared(system, len(appointments))
        preparation = (
            process_cpu_s(pid) - cpu - idle_rate * (time.perf_counter() - started)
        ) / len(appointments)
        for appointment in appointments[:warmup]:
            await launch(http, system, appointment)
        return await _launches_cpu(http, system, appointments[warmup:], idle_rate), preparation


async def bare_cpu(requests: int) -> float:
    """CPU s per request of a constant aiohttp handler in its own process."""
    port = free_port()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BARE_SERVER, str(port), stdout=asyncio.subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/") as r:
                        await r.read()
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            for _ in range(50):  # warm-up
                async with http.get(f"http://127.0.0.1:{port}/") as r:
                    await r.read()
            cpu = process_cpu_s(child.pid)
            for _ in range(requests):
                async with http.get(f"http://127.0.0.1:{port}/") as r:
                    await r.read()
            return (process_cpu_s(child.pid) - cpu) / requests
    finally:
        child.terminate()
        await child.wait()


_lock = asyncio.Lock()
_measured: dict[bool, LaunchCpu] = {}


async def measured(smoke: bool) -> LaunchCpu:
    """One measurement session, shared by the rows below."""
    async with _lock:
        if smoke not in _measured:
            count, warmup = (5, 2) if smoke else (int(os.environ.get("BENCH_LAUNCHES", "300")), 5)
            creating, idle_rate = await launch_cpu(count, warmup)
            prepared, preparation = await prepared_launch_cpu(count, warmup)
            print(
                f"  launch process, {count} launches each: {creating * 1000:.2f} ms CPU per"
                f" launch making its meeting, {prepared * 1000:.2f} ms with the meeting prepared"
                f" ({preparation * 1000:.2f} ms per visit for the booking and its preparation);"
                f" idle {idle_rate * 1000:.1f} ms CPU/s subtracted",
                flush=True,
            )
            _measured[smoke] = LaunchCpu(creating, prepared, preparation, count)
        return _measured[smoke]


_bare: dict[bool, float] = {}


async def bare_per_request(smoke: bool) -> float:
    if smoke not in _bare:
        launches = (await measured(smoke)).launches
        _bare[smoke] = await bare_cpu(max(200, launches * REQUESTS_PER_LAUNCH))
        print(f"  bare aiohttp {_bare[smoke] * 1000:.3f} ms CPU per request", flush=True)
    return _bare[smoke]


def _row(name: str, figure_of: Callable[[LaunchCpu], float], goal: bool) -> Benchmark:
    async def run(smoke: bool) -> Result:
        figure = figure_of(await measured(smoke)) * 1000
        baseline = await bare_per_request(smoke) * 1000
        return Result(
            name=name,
            figure=figure,
            unit="ms",
            baseline=baseline,
            ratio=figure / baseline if baseline > 0 else float("inf"),
            goal=f"<= {GOAL_MS:g} ms" if goal else "(reported)",
            meets_goal=figure <= GOAL_MS if goal else True,
        )

    return Benchmark(name, run)


BENCHMARKS = [
    _row("provider launch CPU, meeting prepared", lambda m: m.prepared, goal=True),
    _row("provider launch CPU, meeting made in launch", lambda m: m.creating, goal=True),
    _row("booking + meeting preparation CPU/visit", lambda m: m.preparation, goal=False),
]


if __name__ == "__main__":
    from bench.harness import print_table

    async def main(smoke: bool) -> list[Result]:
        return [await benchmark.run(smoke) for benchmark in BENCHMARKS]

    print_table(asyncio.run(main("--smoke" in sys.argv)))

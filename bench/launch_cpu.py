"""Provider launch CPU: the launch service's own CPU time per full SMART EHR launch.

The EHR stand-in, the Microsoft stand-in and the launch service each run as a process
(`bench.system`). Each launch is what PowerChart and the clinician's browser do: the EHR
mints a launch, the browser opens `/launch/provider?iss=&launch=`, goes to the EHR's
authorize (auto-approved) and back to `/launch/callback`, where the gateway exchanges the
code, validates the id_token, reads the Encounter and Appointment, creates the meeting
through Graph (createOrGet, the patient's join URL, a call-event subscription whose
validation request comes back to the gateway), records it and opens the provider page.
Appointments are booked without a scheduling webhook, so every launch creates its meeting.

Figure: (utime + stime of the launch process over N launches) / N, from /proc, after a
warm-up (discovery, JWKS, the app token and TLS sessions are cached by then), minus the
process's idle CPU over the same wall time (consumer and relay polling). Baseline, same run:
CPU per request of a bare aiohttp handler returning a constant, in its own process, driven
with as many requests as the launch process served during the measured launches.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
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


async def launch_cpu(
    count: int, warmup: int, extra_env: dict[str, str] | None = None
) -> tuple[float, float, int]:
    """(CPU s per launch, idle CPU s per s, launches)"""
    async with (
        bench_system(
            tenants=1, services=("launch",), webhooks=False, extra_env=extra_env
        ) as system,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=system.client_ssl()),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as http,
    ):
        appointments = await book(http, system, warmup + count)
        for appointment in appointments[:warmup]:
            await launch(http, system, appointment)
        pid = system.pid("launch")
        await asyncio.sleep(0.5)
        idle_started, idle_cpu = time.perf_counter(), process_cpu_s(pid)
        await asyncio.sleep(2.0)
        idle_rate = (process_cpu_s(pid) - idle_cpu) / (time.perf_counter() - idle_started)
        async with system.profiling("launch"):
            started, cpu = time.perf_counter(), process_cpu_s(pid)
            for appointment in appointments[warmup:]:
                await launch(http, system, appointment)
            used = process_cpu_s(pid) - cpu
            elapsed = time.perf_counter() - started
    return (used - idle_rate * elapsed) / count, idle_rate, count


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


async def run(smoke: bool) -> Result:
    count, warmup = (5, 2) if smoke else (int(os.environ.get("BENCH_LAUNCHES", "300")), 5)
    per_launch, idle_rate, launches = await launch_cpu(count, warmup)
    per_request = await bare_cpu(max(200, launches * REQUESTS_PER_LAUNCH))
    print(
        f"  launch process: {per_launch * 1000:.2f} ms CPU per launch over {launches} launches"
        f" (idle {idle_rate * 1000:.1f} ms CPU/s subtracted); bare aiohttp"
        f" {per_request * 1000:.3f} ms CPU per request",
        flush=True,
    )
    figure, baseline = per_launch * 1000, per_request * 1000
    return Result(
        name="provider launch CPU (launch process)",
        figure=figure,
        unit="ms",
        baseline=baseline,
        ratio=figure / baseline if baseline > 0 else float("inf"),
        goal=f"<= {GOAL_MS:g} ms",
        meets_goal=figure <= GOAL_MS,
    )


BENCHMARKS = [Benchmark("provider launch CPU", run)]


if __name__ == "__main__":
    from bench.harness import print_table

    print_table([asyncio.run(run("--smoke" in sys.argv))])

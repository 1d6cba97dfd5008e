"""`make run`: start the stand-ins and the four services, seed sample data, print the URLs,
and stop everything on Ctrl-C.

Kafka and Postgres are started by the Makefile before this runs; they are left running on
exit (`make infra-down` stops them) so that a second `make run` or `make test` starts fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".local" / "logs"
PG_ADMIN_DSN = os.environ.get("PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:15432/postgres")
DATABASE = os.environ.get("EHR_DATABASE_NAME", "ehr_connector")
SAMPLE_TENANT = "contoso-health"
SAMPLE_INTEGRATION = uuid.UUID("0b0c8f1e-5d52-4a8e-9a53-4c7d2f0a1001")


@dataclass(frozen=True)
class Process:
    name: str
    module: str
    port: int
    health: str
    links: tuple[tuple[str, str], ...]
    tls: bool = False

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


PROCESSES = [
    Process("ehr sandbox", "sandbox.ehr", 9100, "/_sandbox/health", (("PowerChart", "/"),)),
    Process(
        "microsoft sandbox",
        "sandbox.microsoft",
        9443,
        "/_sandbox/health",
        (("SMS inboxes", "/_sandbox/sms/inbox"),),
        tls=True,
    ),
    Process("config", "services.config", 8081, "/healthz", ()),
    Process("launch", "services.launch", 8080, "/healthz", ()),
    Process("notify", "services.notify", 8082, "/healthz", ()),
    Process("analytics", "services.analytics", 8083, "/healthz", ()),
]


def available(process: Process) -> bool:
    return importlib.util.find_spec(f"{process.module}.__main__") is not None


async def ensure_database() -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
            print(f"run: created database {DATABASE}")
    finally:
        await conn.close()


def port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def start(process: Process, env: dict[str, str]) -> asyncio.subprocess.Process:
    LOGS.mkdir(parents=True, exist_ok=True)
    log_file = (LOGS / f"{process.module}.log").open("ab")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        process.module,
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )


async def wait_healthy(session: aiohttp.ClientSession, process: Process, within_s: float) -> bool:
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(process.base + process.health) as response:
                if response.status == 200:
                    return True
        await asyncio.sleep(0.3)
    return False


async def seed_sample_appointments(session: aiohttp.ClientSession) -> int:
    """Books today's sample visits through the gateway's scheduling ingress (idempotent)."""
    token = os.environ.get("EHR_SCHEDULING_API_TOKEN", "dev-only-scheduling-token-change-me")
    today = datetime.now(UTC).replace(hour=14, minute=0, second=0, microsecond=0)
    created = 0
    for index, department in enumerate(["Cardiology", "Dermatology", "Family Medicine"]):
        starts = today + timedelta(minutes=30 * index)
        body = {
            "tenant_id": SAMPLE_TENANT,
            "integration_id": str(SAMPLE_INTEGRATION),
            "fhir_appointment_id": f"sample-{index + 1}",
            "environment": "test",
            "department": department,
            "starts_at": starts.isoformat(),
            "ends_at": (starts + timedelta(minutes=20)).isoformat(),
            "time_zone": "America/Chicago",
        }
        async with session.post(
            "http://127.0.0.1:8080/internal/appointments",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            response.raise_for_status()
            created += response.status == 201
    return created


async def main() -> int:
    await ensure_database()
    env = dict(os.environ)
    env.setdefault("EHR_LOG_JSON", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    wanted = [p for p in PROCESSES if available(p)]
    for process in wanted:
        if port_taken(process.port):
            print(
                f"run: port {process.port} ({process.name}) is taken. Stop what uses it"
                f" (ss -ltnp 'sport = :{process.port}') or an earlier `make run`.",
                file=sys.stderr,
            )
            return 1
    children: list[tuple[Process, asyncio.subprocess.Process]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for process in wanted:
            children.append((process, await start(process, env)))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for process, child in children:
                if not await wait_healthy(session, process, within_s=60):
                    code = child.returncode
                    print(
                        f"run: {process.name} did not become healthy"
                        f"{f' (exit {code})' if code is not None else ''};"
                        f" see {LOGS / (process.module + '.log')}",
                        file=sys.stderr,
                    )
                    return 1
            seeded = await seed_sample_appointments(session)
        print("\nThe EHR video-visit connector is running:\n")
        for process in wanted:
            for label, path in process.links or (("health", process.health),):
                print(f"  {process.name:<18} {label:<14} {process.base}{path}")
            if process.health == "/healthz":
                print(f"  {'':<18} {'metrics':<14} {process.base}/metrics")
        print(f"\n  sample appointments booked now: {seeded}; logs in {LOGS}")
        print("  Kafka 127.0.0.1:19092, Postgres 127.0.0.1:15432. Ctrl-C stops the services.\n")
        waiters = [asyncio.create_task(child.wait()) for _, child in children]
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            for process, child in children:
                if child.returncode is not None:
                    print(f"run: {process.name} exited with {child.returncode}", file=sys.stderr)
            return 1
        return 0
    finally:
        print("run: stopping services...")
        for _, child in children:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
        for process, child in children:
            try:
                await asyncio.wait_for(child.wait(), timeout=25)
            except TimeoutError:
                print(f"run: {process.name} did not drain in time; killing it", file=sys.stderr)
                child.kill()
        print("run: stopped. Kafka and Postgres keep running; `make infra-down` stops them.")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

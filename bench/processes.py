"""Services as real processes for the HTTP benchmarks: each on a free port, in one bench
database and under one bench topic prefix (so nothing is shared with `make run` or tests),
optionally pinned to a core with taskset; peak RSS read from /proc.

The baseline server (`BARE_SERVER`) is a bare aiohttp handler returning a constant, set up
like the services (AppRunner, no access log, same event loop), in a process that imports
nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

from infra.ports import free_port as free_port  # bench modules import it from here

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".local" / "logs"
PG_ADMIN_DSN = os.environ.get("PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:15432/postgres")
KAFKA = os.environ.get("EHR_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a process, all its live threads: nanoseconds on CPU from each thread's
    /proc/<pid>/task/<tid>/schedstat, or utime + stime in clock ticks (10 ms) from
    /proc/<pid>/stat where schedstat is missing."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        total = 0
    if total:
        return total / 1e9
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields after the command: state is index 0, so utime (14th field) is index 11.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kafka_broker_pid() -> int | None:
    """The Kafka broker `make infra` started from this checkout (its config lives under our
    `.local`), or None when it runs elsewhere. Its CPU counts every client of the broker."""
    config = str(ROOT / ".local" / "kafka" / "server.properties")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"kafka.Kafka" in argv and config.encode() in argv:
                return int(proc.name)
    return None


async def backend_cpu_s(dsn: str, also: tuple[int, ...] = ()) -> dict[int, float]:
    """CPU seconds so far of each Postgres backend connected to `dsn`'s database (the run's
    own), and of the processes in `also`; processes gone meanwhile are left out."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    found = {}
    for pid in [*also, *(row["pid"] for row in rows)]:
        with contextlib.suppress(OSError):
            found[pid] = process_cpu_s(pid)
    return found


async def create_database(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def drop_run(prefix: str, database: str) -> None:
    """Drops a run's database and deletes its topics; never raises (cleanup)."""
    with contextlib.suppress(Exception):
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()
    with contextlib.suppress(Exception):
        kafka = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
        await kafka.start()
        try:
            mine = [t for t in await kafka.list_topics() if t.startswith(prefix)]
            if mine:
                await kafka.delete_topics(mine)
        finally:
            await kafka.close()


@dataclass
class Child:
    name: str
    port: int
    process: asyncio.subprocess.Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pid)

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    async def wait_ready(self, path: str, within_s: float = 90) -> None:
        deadline = asyncio.get_running_loop().time() + within_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            while asyncio.get_running_loop().time() < deadline:
                if self.process.returncode is not None:
                    break
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with http.get(self.url + path) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.3)
        raise RuntimeError(
            f"{self.name} did not become ready (exit {self.process.returncode});"
            f" see {LOGS / ('bench-' + self.name + '.log')}"
        )

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def spawn(
    name: str, args: list[str], env: dict[str, str], port: int, cpus: str | None = None
) -> Child:
    """`python <args>` in its own session, pinned to `cpus` from its first instruction."""
    LOGS.mkdir(parents=True, exist_ok=True)
    pin = ["taskset", "-c", cpus] if cpus is not None else []
    with (LOGS / f"bench-{name}.log").open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            *pin,
            sys.executable,
            *args,
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    return Child(name, port, process)


BARE_SERVER = """
import asyncio, signal, sys
from aiohttp import web

async def constant(request):
    return web.Response(text="ok")

async def serve(port):
    app = web.Application()
    app.router.add_get("/healthz", constant)
    app.router.add_get("/join/{token}", constant)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await runner.cleanup()

if sys.argv[2] == "uvloop":
    import uvloop
    factory = uvloop.new_event_loop
else:
    factory = asyncio.new_event_loop
with asyncio.Runner(loop_factory=factory) as runner:
    runner.run(serve(int(sys.argv[1])))
"""


async def start_bare(loop: str, cpus: str | None) -> Child:
    port = free_port()
    args = ["-c", BARE_SERVER, str(port), loop]
    child = await spawn(f"bare-{loop}", args, dict(os.environ), port, cpus)
    await ready_or_stopped(child, "/healthz", within_s=30)
    return child


async def ready_or_stopped(child: Child, path: str, within_s: float = 90) -> None:
    """Waits until `child` answers; stops it when it does not (nothing is left running)."""
    try:
        await child.wait_ready(path, within_s)
    except BaseException:
        await child.stop()
        raise


@dataclass(frozen=True)
class BenchSystem:
    """Where the bench's services keep their state; one per benchmark session."""

    database: str
    dsn: str
    prefix: str

    def env(self, service: str, port: int, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EHR_")}
        env |= {
            "PYTHONUNBUFFERED": "1",
            "EHR_DATABASE_URL": self.dsn,
            "EHR_KAFKA_BOOTSTRAP_SERVERS": KAFKA,
            "EHR_KAFKA_TOPIC_PREFIX": self.prefix,
            "EHR_HTTP_PORT": str(port),
            # Free like the HTTP port: the default (HTTP port + 1000) may be taken.
            "EHR_METRICS_PORT": str(free_port()),
            "EHR_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "EHR_LOG_LEVEL": "WARNING",
            "EHR_LOG_JSON": "true",
        }
        if service == "launch":
            env["EHR_NOTIFICATION_PORT"] = str(free_port())
        return env | extra

    async def start(
        self, service: str, cpus: str | None = None, extra: dict[str, str] | None = None
    ) -> Child:
        port = free_port()
        env = self.env(service, port, extra or {})
        child = await spawn(service, ["-m", f"services.{service}"], env, port, cpus)
        await ready_or_stopped(child, "/readyz")
        return child


@contextlib.asynccontextmanager
async def bench_system() -> AsyncIterator[BenchSystem]:
    """A fresh database and topic prefix, dropped and deleted when the block ends."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    await create_database(name)
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    try:
        yield BenchSystem(name, PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name, prefix)
    finally:
        await drop_run(prefix, name)

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
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from infra.sample_data import ADMIN, TENANT_A, Seeded, seed

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".local" / "logs"
# The Makefile derives both from KAFKA_PORT / PG_PORT (an explicit value wins); the same here
# when this runs without it.
PG_ADMIN_DSN = os.environ.get(
    "PG_ADMIN_DSN", f"postgresql://postgres@127.0.0.1:{os.environ.get('PG_PORT', '15432')}/postgres"
)
KAFKA_BOOTSTRAP = os.environ.get(
    "EHR_KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{os.environ.get('KAFKA_PORT', '19092')}"
)
DATABASE = os.environ.get("EHR_DATABASE_NAME", "ehr_connector")


@dataclass(frozen=True)
class Process:
    name: str
    module: str
    port: int
    health: str
    links: tuple[tuple[str, str], ...]
    tls: bool = False
    # The services' second listener, serving only /metrics (the stand-ins have none).
    metrics_port: int | None = None

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return (
            None if self.metrics_port is None else f"http://127.0.0.1:{self.metrics_port}/metrics"
        )

    @property
    def ports(self) -> list[int]:
        return [self.port] + ([] if self.metrics_port is None else [self.metrics_port])


PROCESSES = [
    Process("ehr sandbox", "sandbox.ehr", 9100, "/_sandbox/tenants", ()),
    Process("microsoft sandbox", "sandbox.microsoft", 9443, "/_sandbox/health", (), tls=True),
    Process(
        "config", "services.config", 8081, "/healthz", (("admin portal", "/"),), metrics_port=9081
    ),
    Process("launch", "services.launch", 8080, "/healthz", (), metrics_port=9080),
    Process("notify", "services.notify", 8082, "/healthz", (), metrics_port=9082),
    Process("analytics", "services.analytics", 8083, "/healthz", (), metrics_port=9083),
]
TLS = ROOT / ".local" / "tls"


def service_environment() -> dict[str, str]:
    """Points every service at the local stand-ins; real deployments set these to Microsoft's
    and the EHR's URLs (deploy/)."""
    ca = str(TLS / "ca.pem")
    env = dict(os.environ)
    defaults = {
        "EHR_LOG_JSON": "true",
        "PYTHONUNBUFFERED": "1",
        # The server ensure_database() created the database on, not the settings' default.
        "EHR_DATABASE_URL": PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + DATABASE,
        "EHR_KAFKA_BOOTSTRAP_SERVERS": KAFKA_BOOTSTRAP,
        "EHR_TLS_CA_BUNDLE": ca,
        "EHR_ALLOW_LOOPBACK_HTTP": "true",
        "EHR_ENTRA_AUTHORITY_HOST": "https://127.0.0.1:9443",
        "EHR_GRAPH_BASE_URL": "https://127.0.0.1:9443",
        "EHR_ACS_ENDPOINT": "https://127.0.0.1:9443",
        "EHR_NOTIFICATION_TLS_CERT": str(TLS / "server.pem"),
        "EHR_NOTIFICATION_TLS_KEY": str(TLS / "server.key"),
        "EHR_SCHEDULING_WEBHOOK_SECRETS": '{"*": "dev-only-scheduling-secret"}',
        "MS_SANDBOX_TLS_DIR": str(TLS),
        "MS_SANDBOX_NUMBERS_STATE_FILE": str(ROOT / ".local" / "sandbox" / "acs-numbers.json"),
        "MS_SANDBOX_LRO_DELAY_S": "1.5",
        "MS_SANDBOX_REDIRECT_URIS": "http://127.0.0.1:8081/auth/callback,"
        "http://127.0.0.1:8083/auth/callback",
        "MS_SANDBOX_SMS_WEBHOOK_URL": "http://127.0.0.1:8082/acs/events"
        "?code=dev-only-acs-webhook-secret-change-me",
    }
    for name, value in defaults.items():
        env.setdefault(name, value)
    # Each service picks its own default port; a global one would make them collide.
    env.pop("EHR_HTTP_PORT", None)
    return env


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
    if process.metrics_port is not None:
        env = env | {"EHR_METRICS_PORT": str(process.metrics_port)}
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


class StartFailed(Exception):
    """The system could not start; the message says what to do."""


@dataclass
class RunningSystem:
    processes: list[Process]
    children: list[tuple[Process, asyncio.subprocess.Process]]
    seeded: Seeded
    env: dict[str, str] = field(default_factory=dict)

    def child(self, name: str) -> asyncio.subprocess.Process:
        return next(child for process, child in self.children if process.name == name)

    async def restart(self, name: str, within_s: float = 60) -> asyncio.subprocess.Process:
        """Starts one process again after it exited (or was killed), in the same slot, and
        waits until it is healthy; the block's end stops the new one like the others."""
        index, (process, old) = next(
            (i, pc) for i, pc in enumerate(self.children) if pc[0].name == name
        )
        await old.wait()
        child = await start(process, self.env)
        self.children[index] = (process, child)
        trusted = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5), connector=aiohttp.TCPConnector(ssl=trusted)
        ) as session:
            if not await wait_healthy(session, process, within_s=within_s):
                raise StartFailed(
                    f"{process.name} did not become healthy again;"
                    f" see {LOGS / (process.module + '.log')}"
                )
        return child


@contextlib.asynccontextmanager
async def running_system() -> AsyncIterator[RunningSystem]:
    """Starts the stand-ins and the services, enters the sample data, and stops them all
    (SIGTERM, so each drains) when the block ends."""
    await ensure_database()
    env = service_environment()
    wanted = [p for p in PROCESSES if available(p)]
    for process in wanted:
        for port in process.ports:
            if port_taken(port):
                raise StartFailed(
                    f"port {port} ({process.name}) is taken. Stop what uses it"
                    f" (ss -ltnp 'sport = :{port}') or an earlier `make run`."
                )
    children: list[tuple[Process, asyncio.subprocess.Process]] = []
    try:
        for process in wanted:
            children.append((process, await start(process, env)))
        trusted = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5), connector=aiohttp.TCPConnector(ssl=trusted)
        ) as session:
            for process, child in children:
                if not await wait_healthy(session, process, within_s=60):
                    code = child.returncode
                    raise StartFailed(
                        f"{process.name} did not become healthy"
                        f"{f' (exit {code})' if code is not None else ''};"
                        f" see {LOGS / (process.module + '.log')}"
                    )
        print("run: entering sample data (admin portal, EHR registration, two bookings)...")
        seeded = await seed(str(TLS / "ca.pem"), PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + DATABASE)
        yield RunningSystem(wanted, children, seeded, env)
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


def print_urls(system: RunningSystem) -> None:
    print("\nThe EHR video-visit connector is running:\n")
    for process in system.processes:
        for label, path in process.links or (("health", process.health),):
            print(f"  {process.name:<18} {label:<14} {process.base}{path}")
        if process.metrics_url is not None:
            print(f"  {'':<18} {'metrics':<14} {process.metrics_url}")
    seeded = system.seeded
    print(
        f"\n  PowerChart (EHR)   http://127.0.0.1:9100/powerchart/{TENANT_A}"
        "\n  SMS sent           https://127.0.0.1:9443/_sandbox/sms/messages"
        f" (from {seeded.sending_number}; one phone: /_sandbox/sms/inbox/+13125550110)"
        "\n  Teams meetings     https://127.0.0.1:9443/_sandbox/meetings"
        f"\n  provider launch    {seeded.provider_launch_url}"
        f"\n\n  sign in to the portal as {ADMIN} (any seeded account works);"
        f" {seeded.booked} video visits were just booked; logs in {LOGS}"
    )
    postgres = PG_ADMIN_DSN.split("@", 1)[-1].split("/", 1)[0]
    print(f"  Kafka {KAFKA_BOOTSTRAP}, Postgres {postgres}. Ctrl-C stops the services.\n")


async def main() -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with running_system() as system:
            print_urls(system)
            waiters = [asyncio.create_task(child.wait()) for _, child in system.children]
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
            if stopper not in done:
                for process, child in system.children:
                    if child.returncode is not None:
                        print(
                            f"run: {process.name} exited with {child.returncode}", file=sys.stderr
                        )
                return 1
            return 0
    except StartFailed as exc:
        print(f"run: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""The real system as processes for the end-to-end benchmarks, on free ports with its own
database, topic prefix, EHR tenants and sending numbers, so a benchmark never collides with
`make run`, the tests or another benchmark on the same machine.

What `infra.run.running_system` starts (the two stand-ins and the services, each in its own
process), minus the config portal's seeding: the benchmark publishes `integration-config`
for its tenants itself, as the config service would, and registers the SMART client and the
tenants' launch and webhook URLs in the EHR stand-in's seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from bench.processes import create_database, drop_run, free_port
from infra.run import ROOT, Process, wait_healthy
from libs.common.crypto import DEV_KEYRING, FieldCipher
from libs.common.events import IntegrationConfigV1, Topic, encode_event, make_event
from libs.common.kafka import create_producer
from sandbox.microsoft.directory import CONTOSO_TENANT
from sandbox.tls import TlsFiles, ensure_tls

PG_ADMIN_DSN = os.environ.get("PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:15432/postgres")
KAFKA = os.environ.get("EHR_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
LOGS = ROOT / ".local" / "logs" / "bench"
SMART_CLIENT_ID = "teams-connector-bench"
SMART_CLIENT_SECRET = "bench-smart-client-secret"  # noqa: S105 - local stand-in only
WEBHOOK_SECRET = "bench-scheduling-secret"  # noqa: S105 - local stand-in only
ACS_WEBHOOK_SECRET = "bench-acs-webhook-secret"  # noqa: S105 - local stand-in only
APPOINTMENT_KEY_SECRET = "bench-appointment-key-secret"  # noqa: S105 - local stand-in only
ORGANIZER = "dr.lee@contosohealth.onmicrosoft.com"
SERVICES = ("config", "launch", "notify", "analytics")


@dataclass(frozen=True)
class Tenant:
    """One EHR tenant (FHIR base) with its integration and its own sending number."""

    guid: str
    fhir_base: str
    integration_id: uuid.UUID
    sending_number: str


@dataclass
class BenchSystem:
    run_id: str
    prefix: str
    dsn: str
    tls: TlsFiles
    urls: dict[str, str]
    tenants: list[Tenant]
    children: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    def pid(self, name: str) -> int:
        return self.children[name].pid

    def client_ssl(self) -> ssl.SSLContext:
        return self.tls.client_context()

    @contextlib.asynccontextmanager
    async def profiling(self, *names: str) -> AsyncIterator[None]:
        """Samples the named processes started under BENCH_PROFILE while the block runs."""
        chosen = [n for n in names if profiled(n) and n in self.children]
        for name in chosen:
            self.children[name].send_signal(signal.SIGUSR1)
        try:
            yield
        finally:
            for name in chosen:
                self.children[name].send_signal(signal.SIGUSR2)
            if chosen:
                await asyncio.sleep(5)  # the process renders and saves the session


def _tenants(count: int, ehr_url: str, run_id: str) -> list[Tenant]:
    tenants = []
    for i in range(count):
        guid = str(uuid.UUID(int=(int(run_id, 16) << 64) + i + 1))
        tenants.append(
            Tenant(
                guid=guid,
                fhir_base=f"{ehr_url}/r4/{guid}",
                integration_id=uuid.uuid4(),
                sending_number=f"+1833555{i:04d}",
            )
        )
    return tenants


def _ehr_seed(tenants: Sequence[Tenant], launch_url: str, webhooks: bool) -> dict[str, object]:
    return {
        "tenants": [
            {
                "guid": t.guid,
                "name": f"Bench Hospital {i}",
                "launch_url": f"{launch_url}/launch/provider",
                "webhook_url": f"{launch_url}/ehr/scheduling" if webhooks else None,
                "webhook_secret": WEBHOOK_SECRET,
            }
            for i, t in enumerate(tenants)
        ],
        "clients": [
            {
                "client_id": SMART_CLIENT_ID,
                "redirect_uris": [f"{launch_url}/launch/callback"],
                "auth_method": "client_secret_basic",
                "client_secret": SMART_CLIENT_SECRET,
            }
        ],
    }


def integration_config(tenant: Tenant, cipher: FieldCipher) -> IntegrationConfigV1:
    return IntegrationConfigV1(
        integration_id=tenant.integration_id,
        config_version=1,
        fhir_base_url=tenant.fhir_base,
        environment="production",
        enabled=True,
        department="General Medicine",
        organisation_name="Lakeside Health",
        ms_tenant_id=CONTOSO_TENANT,
        smart_client_id=SMART_CLIENT_ID,
        client_auth_method="client_secret_basic",
        client_secret_encrypted=cipher.encrypt(
            SMART_CLIENT_SECRET, f"integration-secret:{tenant.integration_id}"
        ),
        pkce_mode="required",
        teams_organizer_id=ORGANIZER,
        sms_enabled=True,
        sms_from_number=tenant.sending_number,
    )


# BENCH_PROFILE=launch,notify runs those processes under pyinstrument, sampling on the CPU time
# of the event loop's thread (not wall time: on a 2-core machine shared with other jobs,
# wall-time samples land wherever the process happened to be preempted). The CPU clock costs
# a system call per Python call, which inflates call-heavy code (generators most); with
# BENCH_PROFILE_TIMER=wall the cheap wall clock is used instead. Sampling runs only
# inside `BenchSystem.profiling()`; the session is saved next to the logs (open it with
# `pyinstrument --load FILE`).
PROFILED = """
import os, runpy, signal, sys, time
from pyinstrument import Profiler
from pyinstrument.stack_sampler import get_stack_sampler

profiler = Profiler(interval=0.0005, async_mode="disabled")

def start(*_):
    if os.environ.get("BENCH_PROFILE_TIMER", "cpu") == "cpu":
        get_stack_sampler().timer_func = time.thread_time
    profiler.start()

def stop(*_):
    profiler.stop().save(os.environ["BENCH_PROFILE_OUT"])

signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def profiled(name: str) -> bool:
    return name in os.environ.get("BENCH_PROFILE", "").split(",")


async def _start(
    name: str, module: str, env: dict[str, str], log_dir: Path
) -> asyncio.subprocess.Process:
    log_file = (log_dir / f"{name}.log").open("ab")
    command = ["-m", module]
    if profiled(name):
        command = ["-c", PROFILED, module]
        env = env | {"BENCH_PROFILE_OUT": str(log_dir / f"{name}.pyisession")}
        print(f"bench: profiling {name} into {log_dir / name}.pyisession", flush=True)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )


async def _wait_integrations(dsn: str, schemas: Sequence[str], count: int, log_dir: Path) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 90
        while True:
            counts = []
            for schema in schemas:
                try:
                    query = f"SELECT count(*) FROM {schema}.integrations"  # noqa: S608
                    counts.append(await conn.fetchval(query))
                except asyncpg.UndefinedTableError:
                    counts.append(0)
            if all(c >= count for c in counts):
                return
            if time.monotonic() > deadline:
                lagging = [s for s, c in zip(schemas, counts, strict=True) if c < count]
                raise RuntimeError(
                    f"integrations not applied in time: {dict(zip(schemas, counts, strict=True))}"
                    + "".join(_log_tail(log_dir / f"{s}.log") for s in lagging)
                )
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def _log_tail(path: Path, lines: int = 30) -> str:
    """The end of a service's log, for an error that would otherwise only say "in time"."""
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"\n--- {path}: {exc}"
    return f"\n--- last {len(tail)} lines of {path}:\n" + "\n".join(tail)


@contextlib.asynccontextmanager
async def bench_system(
    *,
    tenants: int,
    services: Sequence[str] = SERVICES,
    webhooks: bool = True,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[BenchSystem]:
    """Starts both stand-ins and `services` as processes and waits until every service has
    applied the tenants' integrations; stops them (SIGTERM) and drops the database and
    topics at the end."""
    run_id = uuid.uuid4().hex[:12]
    prefix, database = f"bench{run_id}.", f"bench_{run_id}"
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + database
    tls = ensure_tls(ROOT / ".local" / "tls")
    ports = {name: free_port() for name in ("ehr", "microsoft", *SERVICES, "launch_tls")}
    metrics_ports = {service: free_port() for service in SERVICES}
    urls = {
        "ehr": f"http://127.0.0.1:{ports['ehr']}",
        "microsoft": f"https://127.0.0.1:{ports['microsoft']}",
        **{s: f"http://127.0.0.1:{ports[s]}" for s in SERVICES},
    }
    ours = _tenants(tenants, urls["ehr"], run_id)
    log_dir = LOGS / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-system-"))
    seed = scratch / "ehr-seed.json"
    seed.write_bytes(orjson.dumps(_ehr_seed(ours, urls["launch"], webhooks)))
    base = dict(os.environ)
    for name in [k for k in base if k.startswith(("EHR_", "MS_SANDBOX_"))]:
        if name != "EHR_KAFKA_BOOTSTRAP_SERVERS":
            del base[name]
    base |= {
        "PYTHONUNBUFFERED": "1",
        "EHR_LOG_JSON": "true",
        "EHR_DATABASE_URL": dsn,
        "EHR_KAFKA_BOOTSTRAP_SERVERS": KAFKA,
        "EHR_KAFKA_TOPIC_PREFIX": prefix,
        "EHR_FIELD_ENCRYPTION_KEYS": DEV_KEYRING.get_secret_value(),
        "EHR_FIELD_ENCRYPTION_ACTIVE_KEY": "dev1",
        "EHR_TLS_CA_BUNDLE": str(tls.ca),
        "EHR_ALLOW_LOOPBACK_HTTP": "true",
        "EHR_ENTRA_AUTHORITY_HOST": urls["microsoft"],
        "EHR_GRAPH_BASE_URL": urls["microsoft"],
        "EHR_ACS_ENDPOINT": urls["microsoft"],
        "EHR_ACS_WEBHOOK_SECRET": ACS_WEBHOOK_SECRET,
        "EHR_APPOINTMENT_KEY_SECRET": APPOINTMENT_KEY_SECRET,
        "EHR_SCHEDULING_WEBHOOK_SECRETS": orjson.dumps({"*": WEBHOOK_SECRET}).decode(),
        "EHR_LAUNCH_PUBLIC_BASE_URL": urls["launch"],
    } | (extra_env or {})
    per_process: dict[str, tuple[str, dict[str, str], Process]] = {
        "ehr": (
            "sandbox.ehr",
            {"EHR_SANDBOX_PORT": str(ports["ehr"]), "EHR_SANDBOX_SEED": str(seed)},
            Process("ehr", "sandbox.ehr", ports["ehr"], "/_sandbox/tenants", ()),
        ),
        "microsoft": (
            "sandbox.microsoft",
            {
                "MS_SANDBOX_PORT": str(ports["microsoft"]),
                "MS_SANDBOX_TLS_DIR": str(tls.directory),
                "MS_SANDBOX_OWNED_NUMBERS": ",".join(t.sending_number for t in ours),
                "MS_SANDBOX_SMS_WEBHOOK_URL": (
                    f"{urls['notify']}/acs/events?code={ACS_WEBHOOK_SECRET}"
                    if "notify" in services
                    else ""
                ),
                "MS_SANDBOX_NUMBERS_STATE_FILE": str(scratch / "acs-numbers.json"),
            },
            Process(
                "microsoft",
                "sandbox.microsoft",
                ports["microsoft"],
                "/_sandbox/health",
                (),
                tls=True,
            ),
        ),
    }
    for service in services:
        env = {
            "EHR_HTTP_PORT": str(ports[service]),
            # Free like the HTTP port: the default (HTTP port + 1000) may be taken.
            "EHR_METRICS_PORT": str(metrics_ports[service]),
            "EHR_PUBLIC_BASE_URL": urls[service],
        }
        if service == "launch":
            env |= {
                "EHR_NOTIFICATION_PORT": str(ports["launch_tls"]),
                "EHR_NOTIFICATION_BASE_URL": f"https://127.0.0.1:{ports['launch_tls']}",
                "EHR_NOTIFICATION_TLS_CERT": str(tls.cert),
                "EHR_NOTIFICATION_TLS_KEY": str(tls.key),
            }
        per_process[service] = (
            f"services.{service}",
            env,
            Process(service, f"services.{service}", ports[service], "/healthz", ()),
        )
    system = BenchSystem(run_id, prefix, dsn, tls, urls, ours)
    await create_database(database)
    try:
        for name, (module, env, _) in per_process.items():
            system.children[name] = await _start(name, module, base | env, log_dir)
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5),
            connector=aiohttp.TCPConnector(ssl=tls.client_context()),
        ) as session:
            for name, (_, _, process) in per_process.items():
                if not await wait_healthy(session, process, within_s=90):
                    raise RuntimeError(f"{name} did not become healthy; see {log_dir}/{name}.log")
        cipher = FieldCipher(DEV_KEYRING, "dev1")
        producer = create_producer(KAFKA)
        await producer.start()
        try:
            for tenant in ours:
                config = integration_config(tenant, cipher)
                event = make_event(
                    Topic.INTEGRATION_CONFIG, "tenant-bench", str(tenant.integration_id), config
                )
                await producer.send(
                    prefix + event.type, encode_event(event), key=event.key.encode()
                )
            await producer.flush()
        finally:
            await producer.stop()
        await _wait_integrations(
            dsn, [s for s in services if s in ("launch", "notify")], len(ours), log_dir
        )
        yield system
    finally:
        for child in system.children.values():
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
        for child in system.children.values():
            try:
                await asyncio.wait_for(child.wait(), timeout=25)
            except TimeoutError:
                child.kill()
                await child.wait()
        await drop_run(prefix, database)

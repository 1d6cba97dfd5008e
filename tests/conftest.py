"""Fixtures for tests that need the real Kafka broker and PostgreSQL server.

`make test` starts both before pytest runs. Every test gets its own database and its own
topic prefix (so its own topics and consumer groups), so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import pytest
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient

from infra.ports import free_port as free_port  # tests import it from here
from libs.common.settings import ServiceSettings
from libs.common.web import METRICS_PORT, SETTINGS

pytest_plugins = [
    "tests.support.standins",
    "tests.support.launch_system",
    "tests.support.other_services",
]

KAFKA = os.environ.get("EHR_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
PG_ADMIN_DSN = os.environ.get("PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:15432/postgres")

S = TypeVar("S", bound=ServiceSettings)


def _reachable(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


@pytest.fixture(scope="session")
def infrastructure() -> None:
    pg_host = PG_ADMIN_DSN.split("@", 1)[1].split("/", 1)[0]
    missing = [
        name for name, hp in (("Kafka", KAFKA), ("PostgreSQL", pg_host)) if not _reachable(hp)
    ]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not reachable. Run `make test`, which starts them, or"
            " `make infra` before running pytest directly."
        )


@pytest.fixture
async def database_url(infrastructure: None) -> AsyncIterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def topic_prefix(infrastructure: None) -> AsyncIterator[str]:
    """A unique prefix: the test's own topics and consumer groups, deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    yield prefix
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


@pytest.fixture
def make_settings(database_url: str, topic_prefix: str) -> Callable[..., Any]:
    def build(cls: type[S], **overrides: Any) -> S:
        values: dict[str, Any] = {
            "database_url": database_url,
            "kafka_bootstrap_servers": KAFKA,
            "kafka_topic_prefix": topic_prefix,
            "http_port": 0,
            # Tests pick free HTTP ports; the default (HTTP port + 1000) could be taken.
            "metrics_port": 0,
            "outbox_poll_interval_s": 0.2,
            "log_json": True,
        }
        values.update(overrides)
        return cls(**values)

    return build


@asynccontextmanager
async def running_app(app: web.Application) -> AsyncIterator[str]:
    """Serves an app on loopback, on its settings' port or an ephemeral one; yields its URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    settings = app.get(SETTINGS)
    site = web.TCPSite(runner, "127.0.0.1", settings.http_port if settings else 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def serve() -> Callable[[web.Application], AbstractAsyncContextManager[str]]:
    return running_app


def metrics_url(app: web.Application) -> str:
    """The /metrics URL of a started service app: its metrics listener, not its own port."""
    return f"http://127.0.0.1:{app[METRICS_PORT]}/metrics"


async def wait_for(event: asyncio.Event, what: str, within_s: float = 20.0) -> None:
    try:
        async with asyncio.timeout(within_s):
            await event.wait()
    except TimeoutError:
        pytest.fail(f"timed out after {within_s}s waiting for {what}")


Waiter = Callable[[asyncio.Event, str], Awaitable[None]]

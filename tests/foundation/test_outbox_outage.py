"""The outbox relay while the broker is unreachable. The broker is reached through a TCP proxy
the test opens and cuts; Kafka itself is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiokafka.client
import pytest
from prometheus_client import REGISTRY

from libs.common.metrics import OUTBOX_RELAY_ERRORS
from libs.common.outbox import OutboxRelay, enqueue
from tests.conftest import KAFKA, wait_for
from tests.support.probe import patient_joined, probe_pool, probe_topics, started_producer


class Proxy:
    """Forwards TCP to the broker until cut; opening it again serves the same port."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Proxy:
    """Routes the client's connections to the broker's advertised address through the proxy."""
    proxy = Proxy(KAFKA)
    real = aiokafka.client.create_conn

    async def routed(host: str, port: int, **kwargs: object) -> object:
        if (host, int(port)) == proxy.target:
            host, port = "127.0.0.1", proxy.port
        return await real(host, port, **kwargs)

    monkeypatch.setattr(aiokafka.client, "create_conn", routed)
    return proxy


class WatchedRelay(OutboxRelay):
    """Tells when its running loop has failed a number of rounds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = 0
        self.failed_twice = asyncio.Event()

    async def _publish_batch(self) -> tuple[int, int]:  # each round of run() and publish_pending
        try:
            return await super()._publish_batch()
        except Exception:
            self.failures += 1
            if self.failures >= 2:
                self.failed_twice.set()
            raise


def oldest_pending_age() -> float:
    value = REGISTRY.get_sample_value("outbox_oldest_pending_age_seconds")
    assert value is not None
    return value


async def test_an_unacknowledged_batch_is_rolled_back_within_the_delivery_timeout(
    database_url: str, topic_prefix: str, proxy: Proxy
) -> None:
    """While the broker is away a round fails after the delivery timeout with its rows pending
    and unlocked; the running relay counts the failures, and publishes once the broker is back."""
    await proxy.open()
    await probe_topics(KAFKA, topic_prefix)
    pool = await probe_pool(database_url)
    producer = await started_producer(f"127.0.0.1:{proxy.port}")
    relay = WatchedRelay(
        pool, producer, schema="probe", topic_prefix=topic_prefix, delivery_timeout_s=1
    )
    task: asyncio.Task[None] | None = None
    try:
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, patient_joined("apt_warm"))
        assert await relay.publish_pending() == 1  # metadata cached, connection up

        await proxy.cut()
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, patient_joined("apt_outage"))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(relay.publish_pending(), 10)
        assert time.monotonic() - started < 5
        # Rolled back: pending again, and no session keeps it locked.
        async with pool.acquire() as conn, conn.transaction():
            locked = await conn.fetch(
                "SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE NOWAIT"
            )
        assert len(locked) == 1
        idle = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
            " AND datname = current_database()"
        )
        assert idle == 0
        await relay.measure()
        assert oldest_pending_age() > 0

        # The running relay fails its rounds, counts them and backs off.
        errors_before = OUTBOX_RELAY_ERRORS._value.get()
        published = asyncio.Event()
        relay.observe(lambda count, _swept: published.set() if count else None)
        task = asyncio.create_task(relay.run())
        relay.failures = 0
        await wait_for(relay.failed_twice, "two failed rounds of the running relay")
        assert OUTBOX_RELAY_ERRORS._value.get() >= errors_before + 2

        await proxy.open()  # the broker is back, on the same port
        await wait_for(published, "the pending event published after the outage", within_s=30)
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    finally:
        if not proxy.serving:  # a failed assertion mid-outage: let the producer flush and stop
            await proxy.open()
        await relay.stop()
        if task is not None:
            await asyncio.wait_for(task, 15)
        await producer.stop()
        await pool.close()


async def test_the_oldest_pending_rows_age_is_exported(
    database_url: str, topic_prefix: str
) -> None:
    """outbox_oldest_pending_age_seconds is the age of the oldest pending row, 0 when none."""
    await probe_topics(KAFKA, topic_prefix)
    pool = await probe_pool(database_url)
    producer = await started_producer(KAFKA)
    relay = OutboxRelay(pool, producer, schema="probe", topic_prefix=topic_prefix)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, patient_joined("apt_waiting"))
        await pool.execute("UPDATE outbox SET created_at = created_at - interval '10 minutes'")
        await relay.measure()
        assert 600 <= oldest_pending_age() < 660

        assert await relay.publish_pending() == 1
        await relay.measure()
        assert oldest_pending_age() == 0
    finally:
        await producer.stop()
        await pool.close()

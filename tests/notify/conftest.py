"""Fixtures for notify: the ACS stand-in over HTTPS, the notify service on real Kafka and
Postgres, a shared hand-driven clock, and helpers that wait on outcomes instead of sleeping."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer

from libs.common.crypto import FieldCipher
from libs.common.events import (
    AppointmentCreatedV1,
    Envelope,
    IntegrationConfigV1,
    Payload,
    Topic,
    encode_event,
    make_event,
)
from libs.common.kafka import create_producer
from libs.common.web import CONSUMERS, DB_POOL
from sandbox.microsoft import SandboxConfig, start_sandbox
from sandbox.microsoft.acs import SmsMessage
from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.clock import ManualClock
from sandbox.tls import TlsFiles, ensure_tls
from services.notify.acs import parse_tag
from services.notify.app import DISPATCHER, PURGER, create_app
from services.notify.scheduler import Dispatcher
from services.notify.settings import NotifySettings
from tests.conftest import KAFKA, wait_for

SENDER = "+18005550100"
OTHER_SENDER = "+18005550111"
PATIENT = "+13125550142"
WEBHOOK_SECRET = "test-webhook-secret"
START = datetime(2030, 1, 7, 14, 0, tzinfo=UTC)
INTEGRATION = uuid.UUID("4b0b3b0e-6c1a-4a43-9c39-1b0c4f1f2a11")
OTHER_INTEGRATION = uuid.UUID("9d6f1c7e-2a3b-4c5d-8e9f-0a1b2c3d4e5f")


def integration_config(
    integration: uuid.UUID = INTEGRATION,
    sender: str | None = SENDER,
    sms_enabled: bool = True,
    offsets: list[int] | None = None,
    version: int = 1,
    organisation: str = "Lakeside Health",
) -> IntegrationConfigV1:
    """The integration-config payload config publishes for a test integration."""
    return IntegrationConfigV1(
        integration_id=integration,
        config_version=version,
        fhir_base_url="https://fhir-ehr.cerner.com/r4/ec2458f2-1e24-41c8-b71b-0e701af7583d",
        environment="production",
        enabled=True,
        department="Cardiology",
        organisation_name=organisation,
        ms_tenant_id="contoso",
        smart_client_id="client",
        client_auth_method="client_secret_basic",
        teams_organizer_id="organizer",
        sms_enabled=sms_enabled,
        sms_from_number=sender,
        reminder_offsets_minutes=offsets or [15],
    )


def kind_of(sms: SmsMessage) -> str | None:
    """The kind of message a send's tag names (`notify:<kind>:<repeatabilityRequestId>`)."""
    tag = parse_tag(sms.tag)
    return tag.kind if tag else None


class Kit:
    """One notify service wired to one ACS stand-in, both on the same manual clock."""

    def __init__(
        self,
        sandbox: RunningSandbox,
        app: web.Application,
        url: str,
        clock: ManualClock,
        producer: AIOKafkaProducer,
        settings: NotifySettings,
        database_url: str,
    ) -> None:
        self.sandbox = sandbox
        self.app = app
        self.url = url
        self.clock = clock
        self.producer = producer
        self.settings = settings
        self.database_url = database_url
        self.cipher: FieldCipher = settings.field_cipher()
        self.handled: list[tuple[str, str]] = []
        self.applied = 0
        self._changed = asyncio.Event()
        self.dispatcher.observe(self._on_round)
        for runner in app[CONSUMERS]:
            runner.observe(self._on_batch)

    @property
    def dispatcher(self) -> Dispatcher:
        return self.app[DISPATCHER]

    @property
    def pool(self) -> asyncpg.Pool:
        return self.app[DB_POOL]

    def _on_round(self, handled: list[tuple[str, str]]) -> None:
        self.handled += handled
        self._changed.set()

    def _on_batch(self, outcomes: list[tuple[str, str, bool]]) -> None:
        self.applied += sum(1 for _, _, applied in outcomes if applied)
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Waits, woken by each dispatcher round and consumer batch, until predicate holds."""

        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        done = asyncio.Event()
        task = asyncio.create_task(loop())
        task.add_done_callback(lambda _: done.set())
        try:
            await wait_for(done, what)
        finally:
            task.cancel()
        task.result()

    def results(self, kind: str) -> list[str]:
        return [result for k, result in self.handled if k == kind]

    async def until_result(self, kind: str, result: str, count: int = 1) -> None:
        await self.until(
            lambda: self.results(kind).count(result) >= count, f"{count} {kind} {result}"
        )

    async def until_applied(self, count: int) -> None:
        await self.until(lambda: self.applied >= count, f"{count} events applied")

    async def advance(self, delta: timedelta) -> None:
        self.clock.advance(delta.total_seconds())
        self.dispatcher.wake()

    def outbound(self) -> list[SmsMessage]:
        return [m for m in self.sandbox.components.acs.state.messages if m.direction == "outbound"]

    async def publish(
        self, topic: Topic, key: str, payload: Payload, tenant: str = "tenant-a"
    ) -> Envelope[Any]:
        event = make_event(topic, tenant, key, payload)
        await self.send_raw(event)
        return event

    async def send_raw(self, event: Envelope[Any]) -> None:
        await self.producer.send_and_wait(
            self.settings.topic(event.type), encode_event(event), key=event.key.encode()
        )

    async def configure(
        self,
        integration: uuid.UUID = INTEGRATION,
        sender: str | None = SENDER,
        sms_enabled: bool = True,
        offsets: list[int] | None = None,
        version: int = 1,
        organisation: str = "Lakeside Health",
    ) -> None:
        payload = integration_config(
            integration, sender, sms_enabled, offsets, version, organisation
        )
        before = self.applied
        await self.publish(Topic.INTEGRATION_CONFIG, str(integration), payload)
        await self.until_applied(before + 1)

    def booking(
        self,
        key: str,
        phone: str | None = PATIENT,
        starts_in: timedelta = timedelta(hours=2),
        integration: uuid.UUID = INTEGRATION,
        sms_enabled: bool = True,
    ) -> AppointmentCreatedV1:
        starts_at = self.clock.now() + starts_in
        return AppointmentCreatedV1(
            integration_id=integration,
            environment="production",
            department="Cardiology",
            starts_at=starts_at,
            ends_at=starts_at + timedelta(minutes=30),
            time_zone="America/Chicago",
            join_url=f"https://visit.example.org/j/{key[-8:]}",
            patient_phone_encrypted=(
                self.cipher.encrypt(phone, f"patient-phone:{key}") if phone else None
            ),
            sms_enabled=sms_enabled,
        )

    async def book(self, key: str, **kwargs: Any) -> AppointmentCreatedV1:
        payload = self.booking(key, **kwargs)
        before = self.applied
        await self.publish(Topic.APPOINTMENT_CREATED, key, payload)
        await self.until_applied(before + 1)
        return payload

    async def crash_dispatcher(self) -> None:
        """A dispatcher in a child process (tests/notify/crash_dispatcher.py) sends the due
        messages and is SIGKILLed once ACS has accepted them, before recording anything."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.notify.crash_dispatcher",
            self.database_url,
            self.settings.acs_endpoint,
            str(self.settings.tls_ca_bundle),
            self.clock.now().isoformat(),
        )
        assert await process.wait() == -signal.SIGKILL

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(sql, *args))

    async def purge(self) -> int:
        return await self.app[PURGER].purge_once()


@pytest.fixture(scope="session")
def notify_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls(tmp_path_factory.mktemp("notify-tls"))


MakeKit = Callable[..., Awaitable[Kit]]


@pytest.fixture
async def make_kit(
    make_settings: Callable[..., Any],
    serve: Callable[[web.Application], Any],
    notify_tls: TlsFiles,
    database_url: str,
) -> AsyncIterator[MakeKit]:
    """Builds a Kit; keyword arguments go to the stand-in (`sandbox_*`) or notify settings."""
    async with AsyncExitStack() as stack:

        async def build(
            sandbox_rate: int = 200, owned: tuple[str, ...] = (SENDER, OTHER_SENDER), **notify: Any
        ) -> Kit:
            clock = ManualClock(START)
            sandbox = await start_sandbox(
                SandboxConfig(
                    port=0,
                    tls_dir=notify_tls.directory,
                    clock=clock,
                    sms_rate_per_minute=sandbox_rate,
                    owned_numbers=owned,
                    notification_retry_delays=(0.01, 0.05, 0.2),
                )
            )
            stack.push_async_callback(sandbox.stop)
            values: dict[str, Any] = {
                "acs_endpoint": sandbox.base_url,
                "tls_ca_bundle": str(notify_tls.ca),
                "acs_webhook_secret": WEBHOOK_SECRET,
                "scheduler_poll_interval_s": 0.1,
                "purge_interval_s": 3600,
            }
            values.update(notify)
            settings = make_settings(NotifySettings, **values)
            app = create_app(settings, clock)
            url = await stack.enter_async_context(serve(app))
            sandbox.components.acs.state.webhook_url = f"{url}/acs/events?code={WEBHOOK_SECRET}"
            producer = create_producer(KAFKA)
            await producer.start()
            stack.push_async_callback(producer.stop)
            return Kit(sandbox, app, url, clock, producer, settings, database_url)

        yield build


@pytest.fixture
async def kit(make_kit: MakeKit) -> Kit:
    return await make_kit()

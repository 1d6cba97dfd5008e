"""The launch gateway wired to both stand-ins, for any test that needs it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from libs.common.kafka import create_producer
from sandbox.ehr import TENANT_A, RunningEhr
from sandbox.microsoft.app import RunningSandbox
from sandbox.tls import TlsFiles
from services.launch.app import create_app
from services.launch.settings import LaunchSettings
from tests.conftest import KAFKA, free_port, wait_for
from tests.support.launch_harness import (
    LaunchSystem,
    integration_config,
    publish_integration,
    register_in_ehr,
    serve_with_tls,
    webhook_secrets,
)


@pytest.fixture
async def producer(infrastructure: None) -> AsyncIterator[AIOKafkaProducer]:
    producer = create_producer(KAFKA)
    await producer.start()
    yield producer
    await producer.stop()


@pytest.fixture
async def launch_system(
    make_settings: Callable[..., Any],
    microsoft: RunningSandbox,
    ehr: RunningEhr,
    standin_tls: TlsFiles,
    ca_bundle: str,
    producer: AIOKafkaProducer,
    topic_prefix: str,
) -> AsyncIterator[LaunchSystem]:
    """The gateway with an integration for EHR tenant A, registered in the EHR stand-in."""
    port, tls_port = free_port(), free_port()
    settings: LaunchSettings = make_settings(
        LaunchSettings,
        http_port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        notification_base_url=f"https://127.0.0.1:{tls_port}",
        entra_authority_host=microsoft.base_url,
        graph_base_url=microsoft.base_url,
        tls_ca_bundle=ca_bundle,
        allow_loopback_http=True,
        scheduling_webhook_secrets=webhook_secrets(),
    )
    app = create_app(settings)
    integration_id = uuid.uuid4()
    fhir_base = ehr.fhir_base(TENANT_A)
    async with serve_with_tls(app, port, tls_port, standin_tls):
        system = LaunchSystem(
            url=f"http://127.0.0.1:{port}",
            notification_url=f"https://127.0.0.1:{tls_port}",
            settings=settings,
            app=app,
            ehr=ehr,
            microsoft=microsoft,
            integration_id=integration_id,
            fhir_base=fhir_base,
        )
        applied = asyncio.Event()
        system.consumer.observe(lambda outcomes: applied.set() if outcomes else None)
        await publish_integration(
            producer,
            topic_prefix,
            "contoso",
            integration_config(settings, integration_id, fhir_base),
        )
        await wait_for(applied, "the gateway to learn the integration")
        async with aiohttp.ClientSession() as http:
            await register_in_ehr(http, system)
        yield system

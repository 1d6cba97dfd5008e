"""Fixtures that run the stand-ins for the outside world (Microsoft, Cerner) in-process,
for service tests. Registered for every test through tests/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sandbox.ehr import EhrSettings, RunningEhr, start_ehr
from sandbox.ehr.clock import FakeClock
from sandbox.microsoft import SandboxConfig, start_sandbox
from sandbox.microsoft.app import RunningSandbox
from sandbox.tls import TlsFiles, ensure_tls


@pytest.fixture(scope="session")
def standin_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway local CA and 127.0.0.1 certificate for the Microsoft stand-in."""
    return ensure_tls(tmp_path_factory.mktemp("standin-tls"))


@pytest.fixture
def ca_bundle(standin_tls: TlsFiles) -> str:
    """The CA path services are given in `tls_ca_bundle` to trust the stand-in."""
    return str(Path(standin_tls.ca))


@pytest.fixture
async def microsoft(standin_tls: TlsFiles) -> AsyncIterator[RunningSandbox]:
    """Entra ID, Graph and ACS stand-in over HTTPS on an ephemeral port."""
    config = SandboxConfig(
        port=0,
        tls_dir=standin_tls.directory,
        lro_delay_s=0.2,
        validation_timeout_s=3,
        notification_retry_delays=(0.01, 0.05, 0.2),
    )
    running = await start_sandbox(config)
    yield running
    await running.stop()


@pytest.fixture
async def microsoft_http(standin_tls: TlsFiles) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that trusts the local CA (verification on) and keeps no cookies."""
    connector = aiohttp.TCPConnector(ssl=standin_tls.client_context())
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


@pytest.fixture
async def ehr() -> AsyncIterator[RunningEhr]:
    """The Cerner stand-in (SMART on FHIR, FHIR R4, scheduling feed) on an ephemeral port."""
    settings = EhrSettings(port=0, webhook_backoff_base=0.01, webhook_backoff_max=0.05)
    running = await start_ehr(settings, FakeClock())
    yield running
    await running.close()

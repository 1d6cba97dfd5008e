"""Fixtures for the sandbox contract tests."""

from collections.abc import AsyncIterator

import aiohttp
import pytest

from sandbox.ehr import TENANT_A, EhrSettings, RunningEhr, start_ehr
from sandbox.ehr.clock import FakeClock
from sandbox.microsoft import SandboxConfig, start_sandbox
from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.clock import ManualClock
from sandbox.tls import TlsFiles, ensure_tls
from tests.sandbox.ehr_helpers import Receiver, Smart
from tests.sandbox.ms_helpers import Receiver as MsReceiver

# --- EHR ("Cerner") stand-in fixtures -------------------------------------------------------


@pytest.fixture
def ehr_clock() -> FakeClock:
    """A hand-driven clock for the EHR stand-in (expiry without sleeping)."""
    return FakeClock()


@pytest.fixture
async def ehr(ehr_clock: FakeClock) -> AsyncIterator[RunningEhr]:
    """The EHR stand-in served on 127.0.0.1 with an ephemeral port."""
    settings = EhrSettings(port=0, webhook_backoff_base=0.01, webhook_backoff_max=0.05)
    running = await start_ehr(settings, ehr_clock)
    yield running
    await running.close()


@pytest.fixture
async def ehr_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client (no cookies kept between requests)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


@pytest.fixture
def smart(ehr: RunningEhr, ehr_http: aiohttp.ClientSession) -> Smart:
    """A SMART app driver bound to tenant A."""
    return Smart(ehr, ehr_http, TENANT_A)


@pytest.fixture
async def ehr_receiver() -> AsyncIterator[Receiver]:
    """A webhook subscriber for the scheduling feed."""
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.close()


# --- Microsoft (Entra / Graph / ACS) stand-in fixtures ----------------------------------------


@pytest.fixture(scope="session")
def ms_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway local CA and 127.0.0.1 server certificate."""
    return ensure_tls(tmp_path_factory.mktemp("ms-tls"))


@pytest.fixture
def ms_clock() -> ManualClock:
    """The stand-in's hand-driven clock."""
    return ManualClock()


@pytest.fixture
async def ms(ms_tls: TlsFiles, ms_clock: ManualClock) -> AsyncIterator[RunningSandbox]:
    """The Microsoft stand-in over HTTPS on an ephemeral port."""
    config = SandboxConfig(
        port=0,
        tls_dir=ms_tls.directory,
        clock=ms_clock,
        lro_delay_s=0.2,
        validation_timeout_s=3,
        notification_retry_delays=(0.01, 0.02, 0.05),
    )
    running = await start_sandbox(config)
    yield running
    await running.stop()


@pytest.fixture
async def ms_http(ms_tls: TlsFiles) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client that trusts only the local CA (verification stays on)."""
    connector = aiohttp.TCPConnector(ssl=ms_tls.client_context())
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


@pytest.fixture
async def ms_receiver(ms_tls: TlsFiles) -> AsyncIterator[MsReceiver]:
    """An HTTPS webhook receiver for Graph notifications and Event Grid events."""
    receiver = MsReceiver(ms_tls)
    await receiver.start()
    yield receiver
    await receiver.close()

"""Fixtures for the sandbox contract tests."""

from collections.abc import AsyncIterator

import aiohttp
import pytest

from sandbox.ehr import TENANT_A, EhrSettings, RunningEhr, start_ehr
from sandbox.ehr.clock import FakeClock
from tests.sandbox.ehr_helpers import Receiver, Smart

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

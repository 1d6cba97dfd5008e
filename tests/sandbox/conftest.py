# --- EHR ("Cerner") stand-in fixtures -------------------------------------------------------
from collections.abc import AsyncIterator as _AsyncIterator

import aiohttp as _aiohttp
import pytest as _pytest

from sandbox.ehr import TENANT_A as _TENANT_A
from sandbox.ehr import EhrSettings as _EhrSettings
from sandbox.ehr import RunningEhr as _RunningEhr
from sandbox.ehr import start_ehr as _start_ehr
from sandbox.ehr.clock import FakeClock as _FakeClock
from tests.sandbox.ehr_helpers import Receiver as _Receiver
from tests.sandbox.ehr_helpers import Smart as _Smart


@_pytest.fixture
def ehr_clock() -> _FakeClock:
    """A hand-driven clock for the EHR stand-in (expiry without sleeping)."""
    return _FakeClock()


@_pytest.fixture
async def ehr(ehr_clock: _FakeClock) -> _AsyncIterator[_RunningEhr]:
    """The EHR stand-in served on 127.0.0.1 with an ephemeral port."""
    settings = _EhrSettings(port=0, webhook_backoff_base=0.01, webhook_backoff_max=0.05)
    running = await _start_ehr(settings, ehr_clock)
    yield running
    await running.close()


@_pytest.fixture
async def ehr_http() -> _AsyncIterator[_aiohttp.ClientSession]:
    """A plain aiohttp client (no cookies kept between requests)."""
    async with _aiohttp.ClientSession(cookie_jar=_aiohttp.DummyCookieJar()) as session:
        yield session


@_pytest.fixture
def smart(ehr: _RunningEhr, ehr_http: _aiohttp.ClientSession) -> _Smart:
    """A SMART app driver bound to tenant A."""
    return _Smart(ehr, ehr_http, _TENANT_A)


@_pytest.fixture
async def ehr_receiver() -> _AsyncIterator[_Receiver]:
    """A webhook subscriber for the scheduling feed."""
    receiver = _Receiver()
    await receiver.start()
    yield receiver
    await receiver.close()

"""Runs notify's dispatcher and SIGKILLs itself the moment ACS has accepted a message, before
the send is recorded: the crash the repeatabilityRequestId must absorb.

    python -m tests.notify.crash_dispatcher <database-url> <acs-endpoint> <ca-bundle> <now-iso>
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import datetime

import aiohttp
import asyncpg

from libs.common.db import create_pool
from services.notify.acs import AcsSmsClient, SendResult
from services.notify.scheduler import Dispatcher
from services.notify.settings import NotifySettings


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self._now = now

    def now(self) -> datetime:
        return self._now


class CrashAfterSend(Dispatcher):
    async def _settle(
        self, row: asyncpg.Record, result: SendResult, segments: int, attempts: int
    ) -> str:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


async def main(dsn: str, endpoint: str, ca_bundle: str, now: str) -> None:
    settings = NotifySettings(database_url=dsn, acs_endpoint=endpoint, tls_ca_bundle=ca_bundle)
    clock = FixedClock(datetime.fromisoformat(now))
    pool = await create_pool(dsn, settings.database_schema)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=settings.ssl_context())
    ) as session:
        acs = AcsSmsClient(endpoint, settings.acs_access_key, session, clock, 10)
        await CrashAfterSend(pool, acs, settings, clock).dispatch_due()
    sys.exit("the dispatcher found nothing to send")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))

"""Runs the probe consumer and SIGKILLs itself at the moment it would commit offsets:
after the batch's effects committed in Postgres, before Kafka learns about it.

    python -m tests.support.crash_consumer <dsn> <bootstrap> <topic-prefix> <group>
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from aiokafka.structs import TopicPartition

from libs.common.kafka import ConsumerRunner
from tests.support.probe import probe_pool, probe_runner, started_producer


class CrashBeforeCommit(ConsumerRunner):
    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        if self._pending:  # the group join also calls commit, with nothing to commit yet
            os.kill(os.getpid(), signal.SIGKILL)


async def main(dsn: str, bootstrap: str, prefix: str, group: str) -> None:
    pool = await probe_pool(dsn)
    producer = await started_producer(bootstrap)
    runner = probe_runner(pool, producer, bootstrap, prefix, group, CrashBeforeCommit)
    await runner.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))

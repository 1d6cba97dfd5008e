"""Topic setup: create what is missing and wait until every partition has a leader.

A topic the controller has accepted is not yet usable: until the broker has applied the new
metadata, produce and ListOffsets answer NotLeaderForPartition, and a metadata request leaves
the topic out altogether. A consumer group joined in that window is assigned none of the
topic's partitions and only notices the topic at its next metadata refresh, five minutes
later (a benchmark on a freshly started, loaded CI machine waited 90 s for a service that
had applied nothing). So setup returns only once every partition is led.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from libs.common.events import dead_letter_topic

log = structlog.get_logger(__name__)

_NO_ERROR = 0
_TOPIC_ALREADY_EXISTS = 36
READY_TIMEOUT_S = 60.0


class TopicSetupError(KafkaError):  # type: ignore[misc]
    """The broker refused to create a topic, or its partitions found no leader in time."""


async def ensure_topics(
    bootstrap_servers: str,
    names: Iterable[str],
    partitions: int,
    replication_factor: int = 1,
    compacted: Iterable[str] = (),
    security: Mapping[str, Any] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Create missing topics with explicit partition counts (existing ones are left alone),
    then wait until every partition of every named topic has a leader."""
    wanted = sorted(set(names))
    compact = set(compacted)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=15_000, **(security or {})
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=name,
                num_partitions=partitions,
                replication_factor=replication_factor,
                topic_configs={"cleanup.policy": "compact"} if name in compact else {},
            )
            for name in wanted
            if name not in existing
        ]
        if missing:
            response = await admin.create_topics(missing)
            # aiokafka returns per-topic errors without raising; another service creating
            # the same catalogue at the same moment is the one expected error.
            refused = {
                e["topic"]: e["error_message"] or f"error code {e['error_code']}"
                for e in response.to_object()["topic_errors"]
                if e["error_code"] not in (_NO_ERROR, _TOPIC_ALREADY_EXISTS)
            }
            if refused:
                raise TopicSetupError(f"the broker refused to create topics: {refused}")
            log.info("kafka topics created", topics=[t.name for t in missing])
        await _wait_until_led(admin, wanted, ready_timeout_s)
    finally:
        await admin.close()


async def _wait_until_led(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        unready = _unready(await admin.describe_topics(names))
        if not unready:
            if waited:
                log.info("kafka topics ready", topics=len(names))
            return
        if time.monotonic() > deadline:
            raise TopicSetupError(
                f"topics without a leader for every partition after {timeout_s:.0f} s: "
                + ", ".join(unready[:10])
            )
        if not waited:
            log.info("waiting for kafka topic leaders", topics=unready[:10], count=len(unready))
            waited = True
        await asyncio.sleep(0.2)


def _unready(described: list[dict[str, Any]]) -> list[str]:
    """Topics the metadata does not list, or lists with a partition without a leader."""
    return sorted(
        t["topic"]
        for t in described
        if t["error_code"] != _NO_ERROR
        or not t["partitions"]
        # Only the leader matters: a partition error such as ReplicaNotAvailable (a follower
        # down in a replicated cluster) leaves it usable.
        or any(p["leader"] < 0 for p in t["partitions"])
    )


def topics_with_dead_letters(names: Iterable[str]) -> list[str]:
    result: list[str] = []
    for name in names:
        result += [name, dead_letter_topic(name)]
    return result

"""Outbound webhooks (Graph change notifications, Event Grid events) with ordered retries."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Delivery:
    """One webhook payload and what happened to it."""

    key: str
    url: str
    payload: Any
    headers: dict[str, str]
    attempts: int = 0
    statuses: list[int | str] = field(default_factory=list)
    delivered: bool = False
    gave_up: bool = False

    def public(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "url": self.url,
            "attempts": self.attempts,
            "statuses": self.statuses,
            "delivered": self.delivered,
            "gaveUp": self.gave_up,
            "payload": self.payload,
        }


class Notifier:
    """Posts JSON to receivers; payloads sharing a key are delivered one at a time, in order."""

    def __init__(self, ssl_context: ssl.SSLContext, retry_delays: tuple[float, ...]) -> None:
        self._ssl = ssl_context
        self._retry_delays = retry_delays
        self._session: aiohttp.ClientSession | None = None
        self._queues: dict[str, asyncio.Queue[Delivery]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self.log: list[Delivery] = []

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(total=15),
            )
        return self._session

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> tuple[int, str, str]:
        """One POST; returns (status, content type, text). Raises on transport errors."""
        async with self._client().post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            return resp.status, resp.content_type, await resp.text()

    def enqueue(
        self, key: str, url: str, payload: Any, headers: dict[str, str] | None = None
    ) -> Delivery:
        delivery = Delivery(key, url, payload, dict(headers or {}))
        self.log.append(delivery)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            self._workers[key] = asyncio.get_running_loop().create_task(self._work(queue))
        queue.put_nowait(delivery)
        return delivery

    async def _work(self, queue: asyncio.Queue[Delivery]) -> None:
        while True:
            delivery = await queue.get()
            await self._deliver(delivery)
            queue.task_done()

    async def _deliver(self, d: Delivery) -> None:
        body = json.dumps(d.payload).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", **d.headers}
        for attempt, delay in enumerate((*self._retry_delays, None)):
            d.attempts = attempt + 1
            try:
                status, _, _ = await self.post(d.url, body, headers, 15)
                d.statuses.append(status)
                if 200 <= status < 300:
                    d.delivered = True
                    return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                d.statuses.append(type(exc).__name__)
            if delay is None:
                d.gave_up = True
                return
            await asyncio.sleep(delay)

    async def drain(self) -> None:
        """Wait until every queued payload was delivered or given up (tests, shutdown)."""
        for queue in list(self._queues.values()):
            await queue.join()

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        self._workers.clear()
        self._queues.clear()
        if self._session is not None:
            await self._session.close()

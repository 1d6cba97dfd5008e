"""Scheduling feed: signed webhooks from the EHR stand-in to a subscriber (docs/ehr-scheduling.md).

``X-EHR-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from sandbox.ehr.clock import Clock
from sandbox.ehr.settings import EhrSettings
from sandbox.ehr.state import Delivery, TenantState

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-EHR-Signature"
EVENT_ID_HEADER = "X-EHR-Event-Id"
TENANT_HEADER = "X-EHR-Tenant"


def sign_webhook(secret: str, body: bytes, timestamp: int) -> str:
    """Return the ``X-EHR-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


@dataclass
class Outgoing:
    event_id: str
    event: str
    appointment_id: str
    body: bytes


def build_event(
    tenant: TenantState,
    event: str,
    appointment: dict[str, Any],
    phone: str | None,
    now: float,
    previous: dict[str, Any] | None = None,
) -> Outgoing:
    event_id = str(uuid.uuid4())
    payload: dict[str, Any] = {
        "event_id": event_id,
        "event": event,
        "tenant": tenant.guid,
        "fhir_base": tenant.fhir_base,
        "occurred_at": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
        "appointment": appointment,
        "patient_contact": {"phone": phone},
    }
    if previous is not None:
        payload["previous"] = previous
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return Outgoing(event_id, event, appointment["id"], body)


class WebhookDispatcher:
    """Delivers events per tenant in order, retrying 5xx and connection errors with backoff."""

    def __init__(self, settings: EhrSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self._queues: dict[str, asyncio.Queue[tuple[TenantState, Outgoing]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        # Observers of every attempt (tests wait on these instead of polling the log).
        self.listeners: list[Callable[[TenantState, Delivery], None]] = []

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()

    def enqueue(self, tenant: TenantState, out: Outgoing) -> None:
        if not tenant.spec.webhook_url:
            tenant.deliveries.append(
                Delivery(
                    event_id=out.event_id,
                    event=out.event,
                    appointment_id=out.appointment_id,
                    url="",
                    attempt=0,
                    at=datetime.fromtimestamp(self.clock(), UTC).isoformat(),
                    status=None,
                    error="no subscriber configured for this tenant; event dropped",
                    delivered=False,
                )
            )
            return
        queue = self._queues.get(tenant.guid)
        if queue is None:
            queue = asyncio.Queue()
            self._queues[tenant.guid] = queue
            self._tasks.append(asyncio.create_task(self._worker(queue)))
        queue.put_nowait((tenant, out))

    async def _worker(self, queue: asyncio.Queue[tuple[TenantState, Outgoing]]) -> None:
        while True:
            tenant, out = await queue.get()
            try:
                await self._deliver(tenant, out)
            except Exception:
                log.exception("webhook delivery of %s crashed", out.event_id)
            finally:
                queue.task_done()

    async def _deliver(self, tenant: TenantState, out: Outgoing) -> None:
        s = self.settings
        for attempt in range(1, s.webhook_max_attempts + 1):
            url, secret = tenant.spec.webhook_url, tenant.spec.webhook_secret or ""
            if not url:
                return
            status, error = await self._post(tenant, url, secret, out)
            delivered = status is not None and 200 <= status < 300
            record = Delivery(
                event_id=out.event_id,
                event=out.event,
                appointment_id=out.appointment_id,
                url=url,
                attempt=attempt,
                at=datetime.fromtimestamp(self.clock(), UTC).isoformat(),
                status=status,
                error=error,
                delivered=delivered,
            )
            tenant.deliveries.append(record)
            for listener in self.listeners:
                listener(tenant, record)
            retryable = status is None or status >= 500 or status == 429
            if delivered or not retryable:
                return
            if attempt < s.webhook_max_attempts:
                delay = min(s.webhook_backoff_base * 2 ** (attempt - 1), s.webhook_backoff_max)
                await asyncio.sleep(delay)

    async def _post(
        self, tenant: TenantState, url: str, secret: str, out: Outgoing
    ) -> tuple[int | None, str | None]:
        assert self._session is not None, "dispatcher not started"
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_webhook(secret, out.body, int(self.clock())),
            EVENT_ID_HEADER: out.event_id,
            TENANT_HEADER: tenant.guid,
        }
        try:
            async with self._session.post(url, data=out.body, headers=headers) as resp:
                await resp.read()
                return resp.status, None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

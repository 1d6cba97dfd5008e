"""Prometheus metrics for operations dashboards.

Labels are environment and department only, never an id; departments beyond a fixed number
per process share the label "other". A handler's observations wait for the consumer to
report its batch committed, so a rolled-back and retried event is counted once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

LOBBY_WAIT = Histogram(
    "lobby_wait_seconds",
    "Lobby wait of a visit: first lobby entry until staff admitted someone",
    ["environment", "department"],
    buckets=(5, 15, 30, 60, 120, 180, 300, 600, 900, 1200, 1800, 3600),
)
DURATION = Histogram(
    "appointment_duration_seconds",
    "Visit duration: staff and a participant both present until the last person left",
    ["environment", "department"],
    buckets=(30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 10800),
)
APPOINTMENTS = Counter(
    "appointments",
    "Visits counted, by status (completed or no_show), when first counted",
    ["environment", "department", "status"],
)
SMS_SENT = Counter(
    "appointment_sms_sent",
    "SMS sent for appointments (outcome sent)",
    ["environment", "department"],
)
EVENT_TO_FACT = Histogram(
    "analytics_event_to_fact_seconds",
    "From the occurred_at of the earliest event in a poll that changed a visit's figures to"
    " their commit; one observation per visit and poll",
    ["environment"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)

Outcome = tuple[str, str, bool]


@dataclass
class MetricsRecorder:
    department_limit: int = 100
    _departments: set[str] = field(default_factory=set)
    _pending: dict[str, list[Callable[[], None]]] = field(default_factory=dict)

    def labels(self, environment: str | None, department: str | None) -> tuple[str, str]:
        env = environment if environment in ("test", "production") else "unknown"
        if department is None:
            return env, "unknown"
        if department not in self._departments:
            if len(self._departments) >= self.department_limit:
                return env, "other"
            self._departments.add(department)
        return env, department

    def stash(self, event_id: str, observation: Callable[[], None]) -> None:
        self._pending.setdefault(event_id, []).append(observation)

    def reset(self, event_id: str) -> None:
        """A handler starts (again): drop what an earlier, rolled-back attempt stashed."""
        self._pending.pop(event_id, None)

    def visit_counted(
        self,
        event_id: str,
        environment: str | None,
        department: str | None,
        status: str,
        lobby_wait_ms: int | None,
        duration_ms: int | None,
    ) -> None:
        env, dept = self.labels(environment, department)

        def observe() -> None:
            APPOINTMENTS.labels(env, dept, status).inc()
            if lobby_wait_ms is not None:
                LOBBY_WAIT.labels(env, dept).observe(lobby_wait_ms / 1000)
            if duration_ms is not None:
                DURATION.labels(env, dept).observe(duration_ms / 1000)

        self.stash(event_id, observe)

    def sms_sent(
        self, event_id: str, environment: str | None, department: str | None, count: int = 1
    ) -> None:
        env, dept = self.labels(environment, department)
        self.stash(event_id, lambda: SMS_SENT.labels(env, dept).inc(count))

    def fact_changed(self, event_id: str, environment: str | None, occurred_at: float) -> None:
        env, _ = self.labels(environment, None)
        self.stash(
            event_id,
            lambda: EVENT_TO_FACT.labels(env).observe(max(0.0, time.time() - occurred_at)),
        )

    def on_batch(self, outcomes: list[Outcome]) -> None:
        """ConsumerRunner observer: the batch's effects are committed."""
        for _topic, event_id, applied in outcomes:
            for observe in self._pending.pop(event_id, []) if applied else []:
                observe()
        # Whatever is left belongs to attempts that rolled back; their retries stash again.
        self._pending.clear()

"""Prometheus metrics shared by every service.

Labels stay bounded: topic, consumer, route template, status class. Never an ID.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests served", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EVENTS_CONSUMED = Counter(
    "events_consumed_total",
    "Kafka messages handled, by outcome: applied, duplicate, dead_lettered, retried",
    ["consumer", "topic", "outcome"],
)
EVENT_HANDLING_LAG = Histogram(
    "event_handling_lag_seconds",
    "From an event's occurred_at to its effect committing",
    ["consumer", "topic"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
CONSUMER_POLL_SECONDS = Histogram(
    "consumer_poll_seconds",
    "Time to apply one poll (step=apply) and to commit offsets (step=commit, at most once"
    " a second while records keep coming); a record fetched meanwhile waits for both",
    ["consumer", "step"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONSUMER_LAG = Gauge(
    "kafka_consumer_lag_messages",
    "High watermark minus the position after the last record fetched, per partition this"
    " member holds (a partition that moves away is no longer exported)",
    ["consumer", "topic", "partition"],
)
DEAD_LETTERED = Counter(
    "dead_lettered_events_total", "Messages sent to a dead-letter topic", ["consumer", "topic"]
)
OUTBOX_PUBLISHED = Counter("outbox_published_total", "Outbox events published", ["topic"])
OUTBOX_RELAY_ERRORS = Counter(
    "outbox_relay_errors_total",
    "Failed outbox relay rounds (a batch not acknowledged within the delivery timeout included)",
)
OUTBOX_PARKED = Counter(
    "outbox_parked_total",
    "Outbox rows the broker refused for good (e.g. larger than it accepts), set aside with"
    " the reason instead of holding back every later event",
    ["topic"],
)
OUTBOX_PARKED_ROWS = Gauge(
    "outbox_parked_rows",
    "Outbox rows parked and waiting for an operator (re-queue or delete); measured by the"
    " relay every 15 s",
)
OUTBOX_OLDEST_PENDING_AGE = Gauge(
    "outbox_oldest_pending_age_seconds",
    "How long the oldest outbox row waiting to be published has waited (0 when none); measured"
    " by the relay every 15 s and ageing in between",
)
OUTBOX_SWEPT = Counter(
    "outbox_swept_total", "Published outbox rows deleted once older than the retention"
)
HOUSEKEEPING_SWEPT = Counter(
    "housekeeping_swept_total",
    "Rows deleted once no longer needed (expired dedupe keys and sign-in state), by table",
    ["table"],
)
HOUSEKEEPING_FAILURES = Counter(
    "housekeeping_failures_total", "Housekeeping sweeps that failed (retried an interval later)"
)

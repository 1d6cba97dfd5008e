"""Notify's metrics. Labels are bounded enumerations: never an id, a number or a text."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SMS_OUTCOMES = Counter(
    "sms_messages_total",
    "Messages finished, by kind and outcome (sent, failed, opted_out, invalid_number, no_consent)",
    ["kind", "outcome"],
)
SMS_RETRIES = Counter(
    "sms_retries_total",
    "Sends put off for later, by cause (provider_throttled, provider_error, rate_limit, waiting)",
    ["cause"],
)
SMS_DEAD_LETTERED = Counter(
    "sms_dead_lettered_total", "Messages given up on after the last attempt", ["kind"]
)
PROVIDER_RESPONSES = Counter(
    "acs_sms_responses_total", "ACS SMS API answers by status class", ["status"]
)
PROVIDER_LATENCY = Histogram(
    "acs_sms_request_seconds",
    "ACS SMS API call latency",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SCHEDULER_CLAIMED = Counter("sms_scheduler_claimed_total", "Due messages taken by a dispatcher")
SCHEDULER_LAG = Histogram(
    "sms_scheduler_lag_seconds",
    "From a message's planned time to its dispatch",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
DELIVERY_REPORTS = Counter(
    "sms_delivery_reports_total",
    "Delivery reports recorded (not redelivered or stale), by status",
    ["status"],
)
SMS_SENT_FROM_REPORTS = Counter(
    "sms_sent_from_delivery_reports_total",
    "Sends recorded from their delivery report, by kind: their answer was lost (a crash, a"
    " timeout) and the message was cancelled or superseded, or refused by its retry (a STOP,"
    " SMS off), before a retry could learn it",
    ["kind"],
)
OPT_OUT_CHANGES = Counter(
    "sms_opt_out_changes_total", "Inbound STOP / START keywords applied", ["action"]
)
WEBHOOK_REFUSED = Counter(
    "acs_webhook_refused_total", "Event Grid deliveries refused, by reason", ["reason"]
)
PHONES_PURGED = Counter("sms_phone_numbers_purged_total", "Encrypted numbers erased")
PHONES_HELD = Gauge("sms_phone_numbers_held", "Encrypted numbers still held (last purge)")


def status_class(status: int) -> str:
    if status == 0:
        return "no_response"
    if status == 429:
        return "429"
    return f"{status // 100}xx"

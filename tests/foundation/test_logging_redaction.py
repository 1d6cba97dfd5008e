from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import structlog

from libs.common.logging import REDACTED, configure_logging, redact_event, redact_text


def test_phone_numbers_in_any_format_are_stripped() -> None:
    """Phone numbers in E.164 and national formats never reach a log line."""
    for phone in [
        "+15550101234",
        "+1 555 010 1234",
        "(555) 010-1234",
        "555.010.1234",
        "555-010-1234",
    ]:
        assert phone not in redact_text(f"sending to {phone} now")
        assert REDACTED in redact_text(f"sending to {phone} now")


def test_email_addresses_are_stripped() -> None:
    """E-mail addresses inside free text are replaced."""
    assert redact_text("user jane.doe@contoso.example signed in") == f"user {REDACTED} signed in"


def test_tokens_are_stripped() -> None:
    """Bearer tokens, JWTs and secret query parameters are replaced."""
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl"
    text = redact_text(f"Authorization: Bearer abc.def-123 and {jwt} at /cb?code=XYZ&state=s3cr3t")
    assert "abc.def-123" not in text
    assert jwt not in text
    assert "XYZ" not in text
    assert "s3cr3t" not in text


def test_names_are_stripped_from_free_text_and_by_key() -> None:
    """A person's name is removed whether it sits in the message or under a name-like key."""
    assert "Jane Doe" not in redact_text("patient: Jane Doe arrived")
    event = redact_event(
        None, "info", {"event": "joined", "patient_name": "Jane Doe", "phone": "x"}
    )
    assert event["patient_name"] == REDACTED
    assert event["phone"] == REDACTED


def test_nested_values_are_stripped() -> None:
    """Redaction walks into dicts and lists."""
    event = redact_event(
        None,
        "info",
        {"event": "e", "ctx": {"to": ["+15550101234"], "note": "call +1 555 010 1234"}},
    )
    assert event["ctx"]["to"] == REDACTED
    assert "555" not in event["ctx"]["note"]


def test_ids_and_timestamps_survive() -> None:
    """What operators need (UUIDs, keys, timestamps, counts) is left alone."""
    text = (
        "event 1b79858c-329e-4965-8af4-cd2a0fbcbbfa key apt_04f567f1"
        " at 2026-11-25T15:00:00Z count=12"
    )
    assert redact_text(text) == text


def test_configured_logger_emits_redacted_json() -> None:
    """The service logger renders JSON with the bound request id and no phone number."""
    configure_logging("test", "INFO", json=True)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(buffer))
        with structlog.contextvars.bound_contextvars(request_id="req-1"):
            structlog.get_logger().info("sms queued for +15550101234", to="+15550101234")
    line = json.loads(buffer.getvalue().strip().splitlines()[-1])
    assert line["request_id"] == "req-1"
    assert "+15550101234" not in buffer.getvalue()

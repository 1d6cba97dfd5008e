"""structlog JSON logging with a redaction processor.

Logs leave the process and land in systems that are not allowed to hold patient data, so
anything that looks like a phone number, an e-mail address, a person's name or a token is
replaced before rendering, whatever key it was logged under.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"

# Keys whose values are never logged, whatever they contain.
SENSITIVE_KEYS = frozenset(
    {
        "access_token",
        "authorization",
        "birth_date",
        "birthdate",
        "client_secret",
        "code",
        "code_verifier",
        "cookie",
        "dob",
        "email",
        "family",
        "given",
        "id_token",
        "mrn",
        "name",
        "password",
        "patient_name",
        "phone",
        "refresh_token",
        "secret",
        "set-cookie",
        "telecom",
        "to",
        "token",
    }
)

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# E.164 and common national formats: +1 555 010 1234, (555) 010-1234, 555.010.1234.
_PHONE = re.compile(r"(?<![\w/])\+?\d[\d\s().-]{8,}\d(?![\w/])")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SECRET_QUERY = re.compile(
    r"(?i)\b(code|token|access_token|id_token|refresh_token|client_secret|code_verifier|launch|state"
    r"|validationToken|sig)=([^&\s]+)"
)
# "Name: Jane Doe" / "patient Jane Doe" style free text; structured names go by key above.
_NAMED_PERSON = re.compile(
    r"(?i)\b(name|patient|practitioner)\s*[:=]\s*[A-Z][a-z]+(?:\s+[A-Z][a-z]+)+"
)


def redact_text(text: str) -> str:
    text = _JWT.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    text = _EMAIL.sub(REDACTED, text)
    text = _NAMED_PERSON.sub(lambda m: f"{m.group(1)}: {REDACTED}", text)
    return _PHONE.sub(REDACTED, text)


def _redact_value(key: str, value: Any) -> Any:
    if key.lower() in SENSITIVE_KEYS:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def redact_event(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: strips phone numbers, e-mails, names and tokens."""
    for key in list(event_dict):
        if key == "event":
            event_dict[key] = redact_text(str(event_dict[key]))
        else:
            event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def configure_logging(service: str, level: str = "INFO", json: bool = True) -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # aiohttp and aiokafka log through the standard library; keep them at warnings, redacted too.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

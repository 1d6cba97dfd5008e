"""Writes docs/configuration.md from the services' Settings classes, so the reference cannot
drift from the code (a test compares the two)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from libs.common.portal_auth import PortalSettings
from libs.common.settings import ServiceSettings
from services.analytics.settings import AnalyticsSettings
from services.config.settings import ConfigSettings
from services.launch.settings import LaunchSettings
from services.notify.settings import NotifySettings

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
SERVICES: list[tuple[str, type[ServiceSettings]]] = [
    ("config", ConfigSettings),
    ("launch", LaunchSettings),
    ("notify", NotifySettings),
    ("analytics", AnalyticsSettings),
]


# For settings whose source line carries no comment of its own.
WHAT_IT_DOES = {
    "http_host": "Address the service listens on (0.0.0.0 in a container).",
    "http_port": "Port the service listens on.",
    "public_base_url": "The service's own URL as browsers and callers reach it; links and"
    " sign-in callbacks are built from it.",
    "database_url": "PostgreSQL DSN; the service uses only its own schema.",
    "database_pool_min": "Smallest asyncpg pool size.",
    "database_pool_max": "Largest asyncpg pool size; replicas x this must fit max_connections.",
    "kafka_bootstrap_servers": "Kafka brokers (host:port, comma-separated).",
    "kafka_sasl_mechanism": "SASL mechanism when the protocol is SASL_*.",
    "kafka_sasl_username": "Kafka user (the service's KafkaUser) when SASL is on.",
    "kafka_sasl_password": "Its password (a Secret file in Kubernetes).",
    "kafka_ssl_cafile": "CA that signs the brokers' TLS certificates; empty = system CAs.",
    "kafka_create_topics": (
        "Create missing topics at start and wait until every partition has a leader;"
        " off where Strimzi owns them."
    ),
    "kafka_topic_partitions": "Partitions for topics the service creates itself.",
    "field_encryption_active_key": "Key id in the key ring that encrypts new values.",
    "log_level": "DEBUG, INFO, WARNING or ERROR.",
    "log_json": "JSON log lines (true) or console lines (false).",
    "outbox_poll_interval_s": "Longest wait of the outbox relay when no NOTIFY wakes it.",
    "consumer_batch_size": "Most records a consumer applies per poll; offsets commit each second.",
    "external_call_timeout_s": "Timeout of every call to the outside world (EHR, Microsoft).",
    "shutdown_drain_timeout_s": "How long SIGTERM waits for consumers and relays to drain.",
    "entra_authority_host": "Microsoft Entra ID authority host (the stand-in locally).",
    "entra_client_id": "The connector's Entra app registration (client id).",
    "entra_client_secret": "Its client secret.",
    "portal_session_ttl_s": "Lifetime of an admin portal session.",
    "smart_probe_timeout_s": "Timeout of the SMART configuration check when a URL is saved.",
    "smart_probe_max_bytes": "Largest SMART configuration document read.",
    "acs_endpoint": "Azure Communication Services resource endpoint.",
    "acs_access_key": "Its access key, for HMAC-signed requests.",
    "acs_phone_numbers_api_version": "ACS phone-numbers API version.",
    "acs_number_country": "Country searched for toll-free numbers.",
    "notification_base_url": "https URL Graph posts call-event notifications to.",
    "notification_tls_cert": "Certificate of the gateway's own TLS listener (local runs).",
    "notification_tls_key": "Its private key.",
    "smart_discovery_ttl_s": "How long a FHIR server's SMART configuration is cached.",
    "launch_state_ttl_s": "Lifetime of a SMART launch state (authorize to callback).",
    "provider_session_ttl_s": "Lifetime of a clinician's provider-page session.",
    "graph_base_url": "Microsoft Graph base URL.",
    "subscription_lifetime_minutes": "Lifetime asked for Graph call-event subscriptions"
    " (Graph allows up to 3 days).",
    "subscription_renew_before_minutes": "Renew a subscription this long before it expires.",
    "join_grace_minutes": "A patient link works until the visit's end plus this.",
    "default_time_zone": "Time zone of visit times in messages when the EHR gives none.",
    "scheduling_max_skew_s": "Oldest signature timestamp accepted on the scheduling feed.",
    "sms_max_attempts": "Attempts before a message is dead-lettered.",
    "sms_backoff_base_s": "First retry delay after a provider error (doubles, with jitter).",
    "sms_backoff_max_s": "Longest retry delay.",
    "sms_send_concurrency": "Sends in flight per replica.",
    "scheduler_batch_size": "Due messages claimed per round.",
    "scheduler_poll_interval_s": "Longest sleep of the dispatcher when nothing wakes it.",
    "purge_interval_s": "How often ended appointments' phone numbers are purged.",
}


def _default(name: str, field: FieldInfo) -> str:
    if field.annotation is SecretStr or "SecretStr" in str(field.annotation):
        return "*(secret; a development value, set it in production)*"
    value = field.get_default(call_default_factory=True)
    text = "" if value is None or value in ((), [], frozenset()) else str(value)
    return f"`{text}`" if text else "*(empty)*"


def _description(cls: type[ServiceSettings], name: str) -> str:
    """The comment above the field in its source, which says why the setting exists."""
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        annotations = inspect.get_annotations(klass)
        if module is None or not getattr(module, "__file__", None) or name not in annotations:
            continue
        lines = Path(str(module.__file__)).read_text().splitlines()
        for index, line in enumerate(lines):
            if line.strip().startswith(f"{name}:"):
                comments: list[str] = []
                back = index - 1
                while back >= 0 and lines[back].strip().startswith("#"):
                    comments.insert(0, lines[back].strip().lstrip("#").strip())
                    back -= 1
                return " ".join(comments)
    return ""


def _rows(cls: type[ServiceSettings], names: list[str]) -> list[str]:
    rows = []
    for name in names:
        field = cls.model_fields[name]
        what = _description(cls, name) or WHAT_IT_DOES.get(name, "")
        rows.append(f"| `EHR_{name.upper()}` | {_default(name, field)} | {what} |")
    return rows


def render() -> str:
    shared = list(ServiceSettings.model_fields)
    portal = [n for n in PortalSettings.model_fields if n not in shared]
    parts = [
        "# Configuration reference",
        "",
        "Generated from the Settings classes by `python -m infra.settings_reference`; a test",
        "keeps it current. Every setting is an environment variable (prefix `EHR_`), or a line",
        "in `.env`, or a file of that name in lower case under `EHR_SECRETS_DIR` (Kubernetes",
        "Secrets), in that order of precedence.",
        "",
        "## Every service",
        "",
        "| setting | default | what it does |",
        "|---|---|---|",
        *_rows(ServiceSettings, shared),
        "",
        "## Portal sign-in (config and analytics)",
        "",
        "| setting | default | what it does |",
        "|---|---|---|",
        *_rows(PortalSettings, portal),
    ]
    for service, cls in SERVICES:
        inherited = set(shared) | (set(portal) if issubclass(cls, PortalSettings) else set())
        own = [n for n in cls.model_fields if n not in inherited or _overrides(cls, n)]
        parts += ["", f"## {service}", "", "| setting | default | what it does |", "|---|---|---|"]
        parts += _rows(cls, own)
    return "\n".join(parts) + "\n"


def _overrides(cls: type[ServiceSettings], name: str) -> bool:
    return name in inspect.get_annotations(cls)


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}")

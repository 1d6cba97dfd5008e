"""Settings shared by every service.

Sources, highest priority first: environment variables, a `.env` file, then Kubernetes
secret files mounted under `secrets_dir` (one file per field, named like the field).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.common.crypto import DEV_KEYRING, FieldCipher

DEFAULT_SECRETS_DIR = "/run/secrets/ehr-connector"
# Default metrics port = HTTP port + this: 8080-8083 become 9080-9083, clear of the stand-ins'
# 9100 and 9443, so the services can run side by side without setting it.
METRICS_PORT_OFFSET = 1000


def _secrets_dir() -> str | None:
    configured = os.environ.get("EHR_SECRETS_DIR", DEFAULT_SECRETS_DIR)
    return configured if Path(configured).is_dir() else None


class ServiceSettings(BaseSettings):
    """What every service needs: where it listens, its database and the broker."""

    model_config = SettingsConfigDict(
        env_prefix="EHR_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    service_name: ClassVar[str] = "service"

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    # Port of a second listener that serves only /metrics, so the public port (which an
    # Ingress routes to) never exposes them; only Prometheus may reach it. Unset = the HTTP
    # port + 1000 (with an HTTP port of 0, any free port); 0 = any free port.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    public_base_url: str = ""

    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:15432/ehr_connector")
    database_pool_min: int = Field(default=1, ge=0)
    database_pool_max: int = Field(default=10, ge=1)
    # Plan every statement for its own parameters (Postgres's plan_cache_mode) instead of
    # reusing a generic plan: for services whose statements carry arrays of hundreds of keys.
    database_custom_plans: bool = False

    kafka_bootstrap_servers: str = "127.0.0.1:19092"
    # In a cluster every service authenticates (SCRAM over TLS) so the broker's ACLs hold;
    # the local broker also takes PLAINTEXT on loopback.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_cafile: str = ""
    # Lets several environments, or several tests, share one cluster without sharing topics.
    kafka_topic_prefix: str = ""
    kafka_create_topics: bool = True
    kafka_topic_partitions: int = Field(default=3, ge=1)

    # Keyed hash secret that turns (integration, FHIR Appointment id) into the appointment key.
    appointment_key_secret: SecretStr = SecretStr("dev-only-appointment-key-secret-change-me")

    # JSON {key_id: base64 32-byte key}; the active key encrypts, every key decrypts.
    field_encryption_keys: SecretStr = DEV_KEYRING
    field_encryption_active_key: str = "dev1"

    # Extra CA (PEM) trusted for outbound HTTPS, e.g. the local stand-ins' CA; empty = system CAs.
    tls_ca_bundle: str = ""

    log_level: str = "INFO"
    log_json: bool = True
    # uvloop (libuv) or the standard library's loop. uvloop serves the patient join at a
    # higher rate, a lower p99 and less CPU per request (docs/performance.md, tenth pass).
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    outbox_poll_interval_s: float = Field(default=1.0, gt=0)
    # Minutes a published outbox event is kept (for operators) before the relay deletes it.
    outbox_retention_minutes: int = Field(default=10, ge=0)
    # Days a consumer's inbox row (and a webhook's delivery id) is kept to recognise a
    # redelivery. It must outlast a record's whole life in any topic it can come back from:
    # retention.ms plus up to segment.ms before its segment goes, 30 + 7 days for the dead-letter
    # topics an operator replays from (make deploy-check compares).
    dedupe_retention_days: int = Field(default=45, ge=1)
    # How often expired dedupe keys and sign-in state are deleted (libs/common/housekeeping.py).
    housekeeping_interval_s: float = Field(default=3600.0, gt=0)
    consumer_batch_size: int = Field(default=100, ge=1)
    # A fetch from Kafka returns once it has this many bytes or has waited this long (Kafka's
    # fetch.min.bytes / fetch.max.wait.ms): 1 byte answers at once, for services whose
    # consumers sit on a patient's path; a service that only aggregates can wait for fuller
    # polls, each applied in a fixed number of statements.
    consumer_fetch_min_bytes: int = Field(default=1, ge=1, le=52_428_800)
    # The longest a fetch waits for consumer_fetch_min_bytes (Kafka's fetch.max.wait.ms).
    consumer_fetch_max_wait_ms: int = Field(default=500, ge=0, le=30_000)
    # External calls made while handling a message must finish well inside the poll interval.
    consumer_max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    external_call_timeout_s: float = Field(default=10.0, gt=0)
    shutdown_drain_timeout_s: float = Field(default=20.0, gt=0)

    @model_validator(mode="after")
    def _metrics_port_of_its_own(self) -> ServiceSettings:
        port = self.metrics_listen_port
        if port > 65535:
            raise ValueError(
                f"EHR_HTTP_PORT + {METRICS_PORT_OFFSET} is no port: set EHR_METRICS_PORT"
            )
        if port != 0 and port == self.http_port:
            raise ValueError("EHR_METRICS_PORT must differ from EHR_HTTP_PORT")
        return self

    def __init__(self, **values: Any) -> None:
        # Unknown EHR_* variables are ignored (a deployment may set variables for another
        # version), but a misspelt keyword in code is a bug and must not pass silently.
        unknown = sorted(set(values) - set(type(self).model_fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting {', '.join(unknown)}")
        super().__init__(_secrets_dir=_secrets_dir(), **values)

    @property
    def metrics_listen_port(self) -> int:
        """The metrics listener's port as configured, or the HTTP port's fixed offset."""
        if self.metrics_port is not None:
            return self.metrics_port
        return self.http_port + METRICS_PORT_OFFSET if self.http_port else 0

    @property
    def database_schema(self) -> str:
        return self.service_name

    def migration_parameters(self) -> dict[str, str]:
        """Settings a migration reads as current_setting('ehr.<name>'); none by default."""
        return {}

    def field_cipher(self) -> FieldCipher:
        return FieldCipher(self.field_encryption_keys, self.field_encryption_active_key)

    def ssl_context(self) -> ssl.SSLContext:
        """Verification always on; the bundle only adds a trusted CA."""
        context = ssl.create_default_context()
        if self.tls_ca_bundle:
            context.load_verify_locations(cafile=self.tls_ca_bundle)
        return context

    def kafka_security(self) -> dict[str, Any]:
        """Connection options shared by every Kafka client this service creates."""
        options: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context()
            if self.kafka_ssl_cafile:
                context.load_verify_locations(cafile=self.kafka_ssl_cafile)
            options["ssl_context"] = context
        if self.kafka_security_protocol.startswith("SASL"):
            if not self.kafka_sasl_username:
                raise ValueError("EHR_KAFKA_SASL_USERNAME is required with SASL")
            options |= {
                "sasl_mechanism": self.kafka_sasl_mechanism,
                "sasl_plain_username": self.kafka_sasl_username,
                "sasl_plain_password": self.kafka_sasl_password.get_secret_value(),
            }
        return options

    def topic(self, name: str) -> str:
        return f"{self.kafka_topic_prefix}{name}"

from __future__ import annotations

import base64
from typing import ClassVar

from pydantic import Field, SecretStr

from libs.common.settings import ServiceSettings

# The stand-in's fixed, obviously fake access key, so local runs sign without configuration.
DEV_ACS_ACCESS_KEY = SecretStr(base64.b64encode(b"ehr-video-visit-sandbox-acs-key!").decode())


class NotifySettings(ServiceSettings):
    service_name: ClassVar[str] = "notify"

    http_port: int = Field(default=8082, ge=0, le=65535)

    # Azure Communication Services: the resource endpoint and its HMAC access key.
    acs_endpoint: str = "https://127.0.0.1:9443"
    acs_access_key: SecretStr = DEV_ACS_ACCESS_KEY
    # Event Grid delivers to `<public>/acs/events?code=<secret>`; the query secret authenticates.
    acs_webhook_secret: SecretStr = SecretStr("dev-only-acs-webhook-secret-change-me")
    # Keys the hash that stands in for an opted-out recipient's number, also kept beside each
    # number held so that a STOP finds them. Changing it forgets the STOPs recorded, and a STOP
    # no longer finds the numbers held before the change (they stay until their visit ends).
    recipient_hash_secret: SecretStr = SecretStr("dev-only-recipient-hash-secret-change-me")
    # Region assumed for numbers written without a country code.
    sms_default_region: str = Field(default="US", min_length=2, max_length=2)

    # ACS refuses more than 200 a minute per toll-free number; stay under it across replicas.
    sms_rate_per_minute: int = Field(default=180, ge=1, le=10_000)
    sms_max_attempts: int = Field(default=6, ge=1, le=50)
    sms_backoff_base_s: float = Field(default=2.0, gt=0)
    sms_backoff_max_s: float = Field(default=300.0, gt=0)
    # Messages a dispatcher holds at once, claimed and not yet answered by ACS (and its
    # connections to ACS); the largest burst it claims in one statement.
    sms_send_concurrency: int = Field(default=32, ge=1, le=512)

    # Off for replicas that only consume; the plan in Postgres waits for a dispatcher.
    scheduler_enabled: bool = True
    scheduler_batch_size: int = Field(default=200, ge=1, le=10_000)
    scheduler_poll_interval_s: float = Field(default=1.0, gt=0)
    # A claimed message becomes due again after this long if its sender vanished mid-send.
    scheduler_lease_s: float = Field(default=120.0, gt=0)
    purge_interval_s: float = Field(default=300.0, gt=0)

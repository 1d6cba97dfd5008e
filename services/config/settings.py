from __future__ import annotations

import base64
from typing import ClassVar

from pydantic import Field, SecretStr

from libs.common.addresses import PrivateNetworks
from libs.common.portal_auth import PortalSettings

# The Microsoft stand-in's fixed, obviously fake ACS key, so local runs sign without setup.
DEV_ACS_ACCESS_KEY = SecretStr(base64.b64encode(b"ehr-video-visit-sandbox-acs-key!").decode())


class ConfigSettings(PortalSettings):
    service_name: ClassVar[str] = "config"

    http_port: int = Field(default=8081, ge=0, le=65535)
    public_base_url: str = "http://127.0.0.1:8081"

    # Where Cerner sends clinicians and patients; the integration records are derived from it.
    launch_public_base_url: str = "http://127.0.0.1:8080"

    # Local stand-ins listen on http://127.0.0.1; production must never reach loopback or
    # plain http from an admin-typed URL (SSRF), so this is off unless a local run sets it.
    allow_loopback_http: bool = False
    # Private networks (CIDRs, comma-separated; RFC 1918 or fc00::/7 only) where an EHR's FHIR
    # or SMART servers may sit, e.g. a hospital's FHIR proxy; set on launch too, and open them
    # on 443 in the NetworkPolicy. Empty = only public addresses (docs/deploy.md, Network).
    outbound_private_networks: PrivateNetworks = ()
    smart_probe_timeout_s: float = Field(default=5.0, gt=0, le=30)
    smart_probe_max_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)

    # Azure Communication Services resource that buys the organisations' sending numbers.
    acs_endpoint: str = "https://127.0.0.1:9443"
    acs_access_key: SecretStr = DEV_ACS_ACCESS_KEY
    acs_phone_numbers_api_version: str = "2022-12-01"
    acs_number_country: str = Field(default="US", pattern=r"^[A-Z]{2}$")
    # How often the job worker looks for due work when nothing wakes it.
    phone_job_poll_interval_s: float = Field(default=1.0, gt=0)
    # ACS may ask for long Retry-After values; cap them so the UI keeps moving.
    phone_job_max_retry_after_s: float = Field(default=5.0, gt=0)
    # A step that keeps failing transiently (network, 5xx) gives up after this many tries.
    phone_job_max_attempts: int = Field(default=20, ge=1)

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr

from libs.common.addresses import PrivateNetworks
from libs.common.settings import ServiceSettings


class LaunchSettings(ServiceSettings):
    service_name: ClassVar[str] = "launch"

    http_port: int = Field(default=8080, ge=0, le=65535)
    # Where Cerner and patients reach the gateway; launch redirect and join links start here.
    public_base_url: str = "http://127.0.0.1:8080"
    # Graph only notifies https URLs: a second listener serves the same app over TLS.
    notification_port: int = Field(default=8443, ge=0, le=65535)
    notification_base_url: str = "https://127.0.0.1:8443"
    notification_tls_cert: str = ""
    notification_tls_key: str = ""

    # SMART on FHIR
    smart_scopes: str = (
        "launch openid fhirUser profile online_access user/Appointment.read"
        " user/Encounter.read user/Patient.read user/Practitioner.read"
    )
    # Scopes of the patient-facing app that patient portals launch (Cerner's patient persona).
    smart_patient_scopes: str = "launch openid fhirUser patient/Appointment.read"
    smart_discovery_ttl_s: float = Field(default=300, ge=0)
    # Stand-ins serve http on loopback; real FHIR and auth servers must be https.
    allow_loopback_http: bool = False
    # Private networks (CIDRs, comma-separated; RFC 1918 or fc00::/7 only) the gateway may
    # connect to, e.g. a hospital's FHIR proxy; set on config too, and open them on 443 in the
    # NetworkPolicy. Empty = only public addresses (docs/deploy.md, Network).
    outbound_private_networks: PrivateNetworks = ()
    launch_state_ttl_s: int = Field(default=600, ge=60, le=3600)
    provider_session_ttl_s: int = Field(default=8 * 3600, ge=300)

    # Microsoft Entra ID (app-only) and Graph.

    # Microsoft Entra ID authority host the gateway's app-only tokens come from.
    entra_authority_host: str = "https://login.microsoftonline.com"
    entra_client_id: str = "6f1c2d3e-4b5a-4c7d-8e9f-a0b1c2d3e4f5"
    entra_client_secret: SecretStr = SecretStr("sandbox-connector-secret")
    graph_base_url: str = "https://graph.microsoft.com"
    subscription_lifetime_minutes: int = Field(default=4230, ge=45, le=4230)
    subscription_renew_before_minutes: int = Field(default=720, ge=10)
    # Meetings are prepared this long before a visit starts, not while the EHR's booking
    # webhook waits (a provider launch or the patient's Join prepares one at once when
    # needed). Inside a subscription's three days, so a prepared meeting's call-event
    # subscription rarely needs renewing.
    meeting_lead_minutes: int = Field(default=24 * 60, ge=0, le=4230)
    # How often the meeting worker looks for visits due a meeting (a booking wakes it too).
    meeting_preparation_interval_s: float = Field(default=5.0, gt=0, le=300)
    # Meetings the worker prepares at once (each holds a database connection meanwhile).
    meeting_preparation_concurrency: int = Field(default=4, ge=1, le=32)
    # While the scheduling feed is busy (an event in the last second), meetings of visits
    # starting later than `meeting_urgent_minutes` start at most this many a second, so a
    # burst of bookings keeps the gateway and database for its confirmations; the rest are
    # prepared once the feed is quiet. Urgent visits are never held back.
    meeting_preparation_busy_rate: float = Field(default=5.0, gt=0, le=1000)
    # A visit starting within this many minutes has its meeting prepared at once, busy or not.
    meeting_urgent_minutes: int = Field(default=60, ge=5, le=4230)

    # Patient join links
    join_token_secret: SecretStr = SecretStr("dev-only-join-token-secret-change-me")
    join_grace_minutes: int = Field(default=60, ge=0, le=24 * 60)
    # From this many minutes before the start, opening the link is a lobby arrival
    # (patient-joined) and Join enters the meeting. Earlier, the page says when to come back:
    # the confirmation carries the link days ahead, and a patient checking it is not waiting.
    lobby_opens_minutes: int = Field(default=30, ge=0, le=24 * 60)
    default_time_zone: str = "America/Chicago"

    # Scheduling feed: JSON {tenant_guid: secret}, the EHR tenant of X-EHR-Tenant; "*" is the
    # fallback for every tenant.
    scheduling_webhook_secrets: SecretStr = SecretStr('{"*": "dev-only-scheduling-secret"}')
    scheduling_max_skew_s: int = Field(default=300, ge=30)

"""In-memory state of the stand-in: tenants, registered clients, launches, codes, tokens."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sandbox.ehr.clock import Clock
from sandbox.ehr.data import TenantData, build_tenant_data
from sandbox.ehr.keys import SigningKey, new_signing_key
from sandbox.ehr.settings import ClientSpec, EhrSettings, TenantSpec

SMART_PATH = "protocols/oauth2/profiles/smart-v1"
PERSONAS = ("provider", "patient")


@dataclass
class Launch:
    """An EHR launch: a clinician's in PowerChart (provider persona), or a patient's own in
    the patient portal (patient persona: patient context only, no practitioner)."""

    launch_id: str
    practitioner: str | None
    patient: str | None
    encounter: str | None
    expires_at: float
    persona: str = "provider"


@dataclass
class AuthCode:
    code: str
    client_id: str
    redirect_uri: str
    scopes: list[str]
    launch: Launch
    code_challenge: str
    nonce: str | None
    expires_at: float
    used: bool = False
    issued_tokens: list[str] = field(default_factory=list)


@dataclass
class Grant:
    """What an access or refresh token stands for."""

    client_id: str
    scopes: list[str]
    launch: Launch
    expires_at: float
    code: str | None = None


@dataclass
class Delivery:
    event_id: str
    event: str
    appointment_id: str
    url: str
    attempt: int
    at: str
    status: int | None
    error: str | None
    delivered: bool

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TenantState:
    def __init__(self, spec: TenantSpec, origin: str, clock: Clock, position: int = 1) -> None:
        self.spec = spec
        self.guid = spec.guid
        self.origin = origin
        now = datetime.fromtimestamp(clock(), UTC)
        prefix = spec.id_prefix or min(position, 9)
        self.data: TenantData = build_tenant_data(spec.guid, prefix, now.date(), now)
        self.signing_key: SigningKey = new_signing_key()
        self.clients: dict[str, ClientSpec] = {}
        self.launches: dict[str, Launch] = {}
        self.codes: dict[str, AuthCode] = {}
        self.access_tokens: dict[str, Grant] = {}
        self.refresh_tokens: dict[str, Grant] = {}
        self.used_jtis: dict[str, float] = {}
        self.deliveries: list[Delivery] = []

    # --- URLs ---------------------------------------------------------------------------
    @property
    def fhir_base(self) -> str:
        return f"{self.origin}/r4/{self.guid}"

    @property
    def auth_base(self) -> str:
        return f"{self.origin}/tenants/{self.guid}/{SMART_PATH}"

    @property
    def authorize_url(self) -> str:
        return self.persona_authorize_url("provider")

    @property
    def patient_authorize_url(self) -> str:
        return self.persona_authorize_url("patient")

    def persona_authorize_url(self, persona: str) -> str:
        return f"{self.auth_base}/personas/{persona}/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.auth_base}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.auth_base}/jwks"

    @property
    def issuer(self) -> str:
        return self.auth_base

    # --- launches -----------------------------------------------------------------------
    def mint_launch(
        self,
        practitioner: str | None,
        patient: str | None,
        encounter: str | None,
        now: float,
        ttl: int,
        style: str = "urlsafe",
        persona: str = "provider",
    ) -> Launch:
        if style == "base64":
            launch_id = "+" + base64.b64encode(secrets.token_bytes(23)).decode() + "/="
        else:
            launch_id = secrets.token_urlsafe(24)
        launch = Launch(
            launch_id=launch_id,
            practitioner=practitioner,
            patient=patient,
            encounter=encounter,
            expires_at=now + ttl,
            persona=persona,
        )
        self.launches[launch.launch_id] = launch
        return launch


class Sandbox:
    """The whole outside world the stand-in models."""

    def __init__(self, settings: EhrSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.tenants: dict[str, TenantState] = {
            t.guid: TenantState(t, settings.origin(), clock, i + 1)
            for i, t in enumerate(settings.tenants)
        }
        for client in settings.clients:
            self.register_client(client)

    def set_origin(self, origin: str) -> None:
        origin = origin.rstrip("/")
        self.settings.public_url = origin
        for tenant in self.tenants.values():
            tenant.origin = origin

    def register_client(self, client: ClientSpec) -> list[str]:
        targets = client.tenants if client.tenants is not None else list(self.tenants)
        unknown = [t for t in targets if t not in self.tenants]
        if unknown:
            raise KeyError(f"unknown tenant(s): {', '.join(unknown)}")
        for guid in targets:
            self.tenants[guid].clients[client.client_id] = client
        return targets

    def tenant(self, guid: str) -> TenantState | None:
        return self.tenants.get(guid)

"""Settings for the EHR ("Cerner") stand-in.

Everything can be given by environment variables (prefix ``EHR_SANDBOX_``), CLI arguments of
``python -m sandbox.ehr`` or directly to :func:`sandbox.ehr.app.create_app`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

# Fixed tenant GUIDs so tests and demos can rely on them.
TENANT_A = "5f3c1a9e-2b7d-4e8a-9c41-0a1b2c3d4e01"
TENANT_B = "8d2e4f60-7a1b-4c3d-8e5f-6a7b8c9d0e02"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9100


class ClientSpec(BaseModel):
    """A SMART client registered with the stand-in (what Cerner's code console holds)."""

    client_id: str = Field(min_length=1)
    redirect_uris: list[str] = Field(min_length=1)
    auth_method: str = Field(
        default="client_secret_basic",
        pattern="^(client_secret_basic|private_key_jwt|none)$",
    )
    client_secret: str | None = None
    jwks: dict[str, object] | None = None
    public_key_pem: str | None = None
    scopes: list[str] | None = None  # None: every scope the stand-in supports
    tenants: list[str] | None = None  # None: every tenant


class TenantSpec(BaseModel):
    """One Cerner tenant (one FHIR base)."""

    guid: str
    name: str
    id_prefix: int | None = Field(default=None, ge=1, le=9)  # None: position in the list
    launch_url: str | None = None
    # Where the patient portal launches the patient-facing app (patient persona).
    patient_launch_url: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None


def default_tenants() -> list[TenantSpec]:
    return [
        TenantSpec(
            guid=TENANT_A,
            name="Sandbox General Hospital",
            id_prefix=1,
            webhook_secret="whsec-sandbox-tenant-a",
        ),
        TenantSpec(
            guid=TENANT_B,
            name="Sandbox Valley Clinics",
            id_prefix=2,
            webhook_secret="whsec-sandbox-tenant-b",
        ),
    ]


class EhrSettings(BaseModel):
    """Runtime settings of the stand-in."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # Public origin used in every URL the stand-in hands out (iss, endpoints, fullUrl).
    # None: http://<host>:<port>. In-process runners set it once the port is known.
    public_url: str | None = None
    tenants: list[TenantSpec] = Field(default_factory=default_tenants)
    clients: list[ClientSpec] = Field(default_factory=list)
    access_token_ttl: int = 570
    code_ttl: int = 60
    launch_ttl: int = 600
    # "base64": launch ids contain '+', '/' and '=' so clients must encode and decode them
    # exactly once (a '+' decoded as a space breaks the launch). "urlsafe": plain tokens.
    launch_id_style: str = Field(default="urlsafe", pattern="^(urlsafe|base64)$")
    refresh_token_ttl: int = 12 * 3600
    webhook_max_attempts: int = 6
    webhook_backoff_base: float = 0.5
    webhook_backoff_max: float = 30.0
    webhook_timeout: float = 5.0

    def origin(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{self.port}"

"""Seeded tenants, users and app registrations of the Entra stand-in."""

from __future__ import annotations

from dataclasses import dataclass, field

GLOBAL_ADMINISTRATOR = "62e90394-69f5-4237-9190-012177145e10"
GLOBAL_READER = "f2ef992c-3afb-46b9-b7cf-a126ee74c451"
REPORTS_READER = "4a5d8f65-41da-4de4-8968-e035b65339cf"
GRAPH_RESOURCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"

CONTOSO_TENANT = "b7e4c1a2-5d3f-4e8a-9c6b-1f2e3d4c5b6a"
FABRIKAM_TENANT = "4d2f8e6a-9b1c-4a7d-8e3f-2c5b7a9d1e0f"

CONNECTOR_CLIENT_ID = "6f1c2d3e-4b5a-4c7d-8e9f-a0b1c2d3e4f5"
CONNECTOR_CLIENT_SECRET = "sandbox-connector-secret"
DEFAULT_APP_ROLES = (
    "OnlineMeetings.ReadWrite.All",
    "OnlineMeetingArtifact.Read.All",
    "VirtualAppointment.ReadWrite.All",
)
DEFAULT_REDIRECT_URIS = (
    "https://127.0.0.1:8443/auth/callback",
    "https://127.0.0.1:8000/auth/callback",
    "http://127.0.0.1:8000/auth/callback",
    "http://127.0.0.1:8080/auth/callback",
)


@dataclass(frozen=True)
class Tenant:
    id: str
    display_name: str
    domain: str


@dataclass(frozen=True)
class User:
    oid: str
    tenant_id: str
    upn: str
    display_name: str
    wids: tuple[str, ...] = ()


@dataclass
class App:
    """An app registration (multi-tenant, consented in every seeded tenant)."""

    client_id: str
    display_name: str
    secrets: list[str] = field(default_factory=list)
    redirect_uris: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=lambda: list(DEFAULT_APP_ROLES))
    certificate_pems: list[str] = field(default_factory=list)
    service_principal_id: str = ""

    def public(self) -> dict[str, object]:
        return {
            "clientId": self.client_id,
            "displayName": self.display_name,
            "redirectUris": self.redirect_uris,
            "roles": self.roles,
            "hasSecret": bool(self.secrets),
            "certificates": len(self.certificate_pems),
        }


def _users(tenant: str, domain: str, ids: tuple[str, str, str, str, str]) -> list[User]:
    return [
        User(ids[0], tenant, f"admin@{domain}", "Avery Admin", (GLOBAL_ADMINISTRATOR,)),
        User(ids[1], tenant, f"reader@{domain}", "Riley Reader", (GLOBAL_READER,)),
        User(ids[2], tenant, f"reports@{domain}", "Remy Reports", (REPORTS_READER,)),
        User(ids[3], tenant, f"user@{domain}", "Uma User"),
        User(ids[4], tenant, f"dr.lee@{domain}", "Dr Jordan Lee"),
    ]


class Directory:
    """Tenants, users and apps; mutable through the admin API."""

    def __init__(self, extra_redirect_uris: tuple[str, ...] = ()) -> None:
        self.tenants = {
            t.id: t
            for t in (
                Tenant(CONTOSO_TENANT, "Contoso Health", "contosohealth.onmicrosoft.com"),
                Tenant(FABRIKAM_TENANT, "Fabrikam Clinics", "fabrikamclinics.onmicrosoft.com"),
            )
        }
        users = _users(
            CONTOSO_TENANT,
            "contosohealth.onmicrosoft.com",
            (
                "11111111-aaaa-4aaa-8aaa-000000000001",
                "11111111-aaaa-4aaa-8aaa-000000000002",
                "11111111-aaaa-4aaa-8aaa-000000000003",
                "11111111-aaaa-4aaa-8aaa-000000000004",
                "11111111-aaaa-4aaa-8aaa-000000000005",
            ),
        ) + _users(
            FABRIKAM_TENANT,
            "fabrikamclinics.onmicrosoft.com",
            (
                "22222222-bbbb-4bbb-8bbb-000000000001",
                "22222222-bbbb-4bbb-8bbb-000000000002",
                "22222222-bbbb-4bbb-8bbb-000000000003",
                "22222222-bbbb-4bbb-8bbb-000000000004",
                "22222222-bbbb-4bbb-8bbb-000000000005",
            ),
        )
        self.users = {u.oid: u for u in users}
        self.apps: dict[str, App] = {}
        self.register(
            App(
                client_id=CONNECTOR_CLIENT_ID,
                display_name="EHR Video Visit Connector",
                secrets=[CONNECTOR_CLIENT_SECRET],
                redirect_uris=[*DEFAULT_REDIRECT_URIS, *extra_redirect_uris],
                service_principal_id="9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            )
        )

    def register(self, app: App) -> App:
        if not app.service_principal_id:
            app.service_principal_id = app.client_id
        self.apps[app.client_id] = app
        return app

    def tenant(self, ref: str) -> Tenant | None:
        """Find a tenant by GUID or verified domain."""
        ref = ref.lower()
        for t in self.tenants.values():
            if ref in (t.id, t.domain):
                return t
        return None

    def user(self, ref: str) -> User | None:
        """Find a user by object id or UPN."""
        ref = ref.lower()
        for u in self.users.values():
            if ref in (u.oid, u.upn.lower()):
                return u
        return None

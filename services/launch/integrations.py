"""The gateway's view of the integrations the config service publishes.

`integration-config` is compacted and keyed by integration id; the projection keeps the
highest `config_version` per integration. Lookups read Postgres through a short cache, so a
change an admin makes is live on every replica within `CACHE_TTL_S` plus the relay delay.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from libs.common.events import Envelope, IntegrationConfigV1

if TYPE_CHECKING:
    from libs.common.db import Connection

log = structlog.get_logger(__name__)

CACHE_TTL_S = 2.0


@dataclass(frozen=True)
class Integration:
    integration_id: uuid.UUID
    tenant_id: str
    fhir_base_url: str
    environment: str
    department: str
    organisation_name: str
    ms_tenant_id: str
    smart_client_id: str
    client_auth_method: str
    client_secret_encrypted: str | None
    private_key_encrypted: str | None
    pkce_mode: str
    teams_organizer_id: str
    sms_enabled: bool

    @property
    def secret_purpose(self) -> str:
        return f"integration-secret:{self.integration_id}"


async def on_integration_config(conn: Connection, event: Envelope[Any]) -> None:
    config = event.payload
    assert isinstance(config, IntegrationConfigV1)
    await conn.execute(
        "INSERT INTO integrations (integration_id, config_version, tenant_id, deleted, enabled,"
        " fhir_base_url, environment, department, organisation_name, ms_tenant_id,"
        " smart_client_id, client_auth_method, client_secret_encrypted, private_key_encrypted,"
        " pkce_mode, teams_organizer_id, sms_enabled)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)"
        " ON CONFLICT (integration_id) DO UPDATE SET config_version = excluded.config_version,"
        "  tenant_id = excluded.tenant_id, deleted = excluded.deleted, enabled = excluded.enabled,"
        "  fhir_base_url = excluded.fhir_base_url, environment = excluded.environment,"
        "  department = excluded.department, organisation_name = excluded.organisation_name,"
        "  ms_tenant_id = excluded.ms_tenant_id, smart_client_id = excluded.smart_client_id,"
        "  client_auth_method = excluded.client_auth_method,"
        "  client_secret_encrypted = excluded.client_secret_encrypted,"
        "  private_key_encrypted = excluded.private_key_encrypted,"
        "  pkce_mode = excluded.pkce_mode, teams_organizer_id = excluded.teams_organizer_id,"
        "  sms_enabled = excluded.sms_enabled, updated_at = now()"
        # Compaction and redelivery can replay an older version; never go backwards.
        " WHERE integrations.config_version < excluded.config_version",
        config.integration_id,
        config.config_version,
        event.tenant_id,
        config.deleted,
        config.enabled,
        config.fhir_base_url,
        config.environment,
        config.department,
        config.organisation_name,
        config.ms_tenant_id,
        config.smart_client_id,
        config.client_auth_method,
        config.client_secret_encrypted,
        config.private_key_encrypted,
        config.pkce_mode,
        config.teams_organizer_id,
        config.sms_enabled,
    )


_COLUMNS = (
    "integration_id, tenant_id, fhir_base_url, environment, department, organisation_name,"
    " ms_tenant_id, smart_client_id, client_auth_method, client_secret_encrypted,"
    " private_key_encrypted, pkce_mode, teams_organizer_id, sms_enabled"
)


class IntegrationDirectory:
    """Enabled integrations, by id and by FHIR base URL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._loaded_at = -CACHE_TTL_S
        self._by_id: dict[uuid.UUID, Integration] = {}
        self._by_base: dict[str, Integration] = {}

    async def _refresh(self) -> None:
        if time.monotonic() - self._loaded_at < CACHE_TTL_S:
            return
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM integrations WHERE enabled AND NOT deleted"  # noqa: S608
        )
        integrations = [Integration(**dict(row)) for row in rows]
        self._by_id = {i.integration_id: i for i in integrations}
        by_base: dict[str, Integration] = {}
        shared: set[str] = set()
        for integration in integrations:
            if integration.fhir_base_url in by_base:
                shared.add(integration.fhir_base_url)
            by_base[integration.fhir_base_url] = integration
        for base in shared:
            # Config keys bases by tenant, so two tenants can claim one FHIR base. Picking
            # either would hand one tenant's visits to the other: resolve it to neither.
            del by_base[base]
            log.warning("fhir base configured by more than one integration", iss_length=len(base))
        self._by_base = by_base
        self._loaded_at = time.monotonic()

    async def by_id(self, integration_id: uuid.UUID) -> Integration | None:
        await self._refresh()
        return self._by_id.get(integration_id)

    async def by_fhir_base(self, iss: str) -> Integration | None:
        """Exact, byte-for-byte match: SMART `aud` must equal `iss`, and anything looser
        would let a crafted `iss` reach a server we never configured. None as well when
        more than one integration has this base (only its own launch URL can tell them
        apart)."""
        await self._refresh()
        return self._by_base.get(iss)

    def invalidate(self) -> None:
        self._loaded_at = -CACHE_TTL_S

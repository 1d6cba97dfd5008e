"""Integrations: one FHIR base URL of one tenant, with its SMART client and Teams settings.

Every change checks the URL (no SSRF), reads its SMART configuration, encrypts secrets, and
then, in one transaction, writes the row, the audit entry and the `integration-config` event.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from libs.common.events import ClientAuthMethod, Environment, PkceMode
from libs.common.portal_auth import Principal
from services.config import audit, propagation
from services.config.context import ConfigContext, Refused, not_found
from services.config.fhir_urls import InvalidFhirUrl, check_fhir_base_url
from services.config.records import integration_records
from services.config.smart_probe import (
    SmartConfiguration,
    SmartProbeFailed,
    probe_smart_configuration,
)

_TEXT = re.compile(r"^[^\x00-\x1f\x7f<>]*$")
_VSCHARS = re.compile(r"[\x20-\x7e]*")
_PEM_TEXT = re.compile(r"[\x20-\x7e\t\r\n]*")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_UPN = re.compile(r"^[A-Za-z0-9._%+'-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def _plain_text(value: str) -> str:
    value = value.strip()
    if not _TEXT.match(value):
        raise ValueError("must be plain text without control characters or < >")
    return value


class IntegrationInput(BaseModel):
    """What the admin submits for one FHIR base URL. Secrets are write-only: leave them out
    on an edit to keep the stored value."""

    model_config = ConfigDict(extra="forbid", str_max_length=20_000)

    fhir_base_url: str = Field(min_length=1, max_length=2048)
    environment: Environment
    enabled: bool = Field(default=True, strict=True)
    smart_client_id: str = Field(min_length=1, max_length=200)
    client_auth_method: ClientAuthMethod = "client_secret_basic"
    client_secret: SecretStr | None = Field(default=None, max_length=4096)
    # A 4096-bit RSA PEM is about 3.3 KB (with CRLF line ends from a browser form); larger
    # keys are refused anyway, and checking a huge one costs seconds of CPU.
    private_key: SecretStr | None = Field(default=None, max_length=4096)
    pkce_mode: PkceMode = "required"
    teams_organizer_id: str = Field(min_length=1, max_length=200)
    department: str = Field(default="", max_length=200)
    organisation_name: str = Field(min_length=1, max_length=200)

    @field_validator("smart_client_id", "department", "organisation_name")
    @classmethod
    def _text(cls, value: str) -> str:
        return _plain_text(value)

    @field_validator("smart_client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if not value or " " in value:
            raise ValueError("must be the client id from the Cerner Code Console, without spaces")
        return value

    @field_validator("teams_organizer_id")
    @classmethod
    def _organizer(cls, value: str) -> str:
        value = value.strip()
        if not (_GUID.match(value) or _UPN.match(value)):
            raise ValueError("must be an Entra user object id or a user principal name")
        return value.lower()

    @field_validator("client_secret", "private_key", mode="before")
    @classmethod
    def _blank_is_absent(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    # The limits above count characters, but the integration-config event's ciphertext grows
    # with bytes: 4096 characters of "é" overflowed it (a 500 after the checks). Both secrets
    # are ASCII anyway: an OAuth client secret is VSCHARs (RFC 6749, appendix A), a PEM is
    # base64 between ASCII armour lines.
    @field_validator("client_secret")
    @classmethod
    def _client_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _VSCHARS.fullmatch(value.get_secret_value()):
            raise ValueError("must be the secret from the Cerner Code Console (ASCII characters)")
        return value

    @field_validator("private_key")
    @classmethod
    def _pem_text(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _PEM_TEXT.fullmatch(value.get_secret_value()):
            raise ValueError("must be a PEM private key (ASCII text)")
        return value


MAX_RSA_KEY_BITS = 4096
_KEY_RULE = "The private key must be RSA (2048 to 4096 bits, RS384) or EC P-384 (ES384)."
_NOT_A_KEY = "The private key is not an unencrypted PEM private key."


def _load_private_key(pem: bytes, *, check_rsa: bool) -> PrivateKeyTypes:
    try:
        return load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=not check_rsa
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # UnsupportedAlgorithm: e.g. an EC key on a curve this build cannot load.
        raise Refused(422, _NOT_A_KEY, "private_key") from None


async def _check_private_key(ctx: ConfigContext, pem: str) -> None:
    """Refuse a PEM that is not an RSA (2048 to 4096 bits) or EC P-384 private key.

    Checking an RSA key costs CPU that grows steeply with the size of its primes (a 12,288-bit
    key: 18 s). So the key is first read unchecked, and only a key of at most 4096 bits made of
    two primes of half its size each (about 0.3 s to check) gets the full check, one at a time,
    in a worker thread.
    """
    raw = pem.strip().encode()
    key = _load_private_key(raw, check_rsa=False)
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return
    if not isinstance(key, rsa.RSAPrivateKey) or not 2048 <= key.key_size <= MAX_RSA_KEY_BITS:
        raise Refused(422, _KEY_RULE, "private_key")
    numbers = key.private_numbers()
    # Key generators make both primes half the modulus; a larger one only makes the check slow.
    if max(numbers.p.bit_length(), numbers.q.bit_length()) > key.key_size // 2 + 16:
        raise Refused(
            422, "The private key is not a standard RSA key: its primes differ in size.",
            "private_key",
        )  # fmt: skip
    async with ctx.key_check:
        await asyncio.to_thread(_load_private_key, raw, check_rsa=True)


async def _check_new_private_key(ctx: ConfigContext, data: IntegrationInput) -> None:
    if data.client_auth_method == "private_key_jwt" and data.private_key is not None:
        await _check_private_key(ctx, data.private_key.get_secret_value())


async def checked_smart_configuration(
    ctx: ConfigContext, raw_url: str
) -> tuple[str, SmartConfiguration]:
    settings = ctx.settings
    try:
        checked = await check_fhir_base_url(
            raw_url,
            allow_loopback=settings.allow_loopback_http,
            allowed_networks=settings.outbound_private_networks,
        )
    except InvalidFhirUrl as exc:
        raise Refused(422, str(exc), "fhir_base_url") from None
    try:
        found = await probe_smart_configuration(
            checked,
            ssl_context=settings.ssl_context(),
            timeout_s=settings.smart_probe_timeout_s,
            max_bytes=settings.smart_probe_max_bytes,
        )
    except SmartProbeFailed as exc:
        raise Refused(422, str(exc), "fhir_base_url") from None
    return checked.url, found


def public_view(ctx: ConfigContext, row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """The integration as the portal and the API show it: secrets only as "is set"."""
    smart = row["smart_configuration"]
    checked_at: datetime | None = row["smart_checked_at"]
    discovered = orjson.loads(smart) if isinstance(smart, str) else smart
    return {
        "id": str(row["id"]),
        "fhir_base_url": row["fhir_base_url"],
        "environment": row["environment"],
        "enabled": row["enabled"],
        "smart_client_id": row["smart_client_id"],
        "client_auth_method": row["client_auth_method"],
        "client_secret_set": row["client_secret_encrypted"] is not None,
        "private_key_set": row["private_key_encrypted"] is not None,
        "pkce_mode": row["pkce_mode"],
        "teams_organizer_id": row["teams_organizer_id"],
        "department": row["department"],
        "organisation_name": row["organisation_name"],
        "phone_number_id": str(row["phone_number_id"]) if row["phone_number_id"] else None,
        "config_version": row["config_version"],
        "smart_configuration": discovered,
        "smart_checked_at": checked_at.isoformat() if checked_at else None,
        "records": [r.as_dict() for r in integration_records(ctx.settings, row["id"], row)],
    }


def _audit_view(view: dict[str, Any]) -> dict[str, Any]:
    # The audit shows what the admin decides; derived and bulky fields stay out.
    return {
        k: v
        for k, v in view.items()
        if k not in ("records", "smart_configuration", "smart_checked_at", "config_version")
    }


async def list_for_tenant(ctx: ConfigContext, tenant_id: str) -> list[dict[str, Any]]:
    rows = await ctx.pool.fetch(
        "SELECT * FROM integrations WHERE tenant_id = $1 ORDER BY environment DESC, created_at",
        tenant_id,
    )
    return [public_view(ctx, row) for row in rows]


def parse_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise not_found("FHIR base URL") from None


async def get(ctx: ConfigContext, tenant_id: str, integration_id: uuid.UUID) -> dict[str, Any]:
    row = await ctx.pool.fetchrow(
        "SELECT * FROM integrations WHERE id = $1 AND tenant_id = $2", integration_id, tenant_id
    )
    if row is None:
        raise not_found("FHIR base URL")
    return public_view(ctx, row)


def _secrets(
    ctx: ConfigContext,
    integration_id: uuid.UUID,
    data: IntegrationInput,
    existing: asyncpg.Record | None,
) -> tuple[str | None, str | None]:
    purpose = propagation.secret_purpose(integration_id)
    if data.client_auth_method == "client_secret_basic":
        if data.client_secret is not None:
            return ctx.cipher.encrypt(data.client_secret.get_secret_value(), purpose), None
        if existing is not None and existing["client_secret_encrypted"] is not None:
            return existing["client_secret_encrypted"], None
        raise Refused(422, "Enter the client secret from the Cerner Code Console.", "client_secret")
    if data.private_key is not None:
        # Checked by _check_new_private_key before the transaction.
        pem = data.private_key.get_secret_value().strip()
        return None, ctx.cipher.encrypt(pem, purpose)
    if existing is not None and existing["private_key_encrypted"] is not None:
        return None, existing["private_key_encrypted"]
    raise Refused(422, "Paste the private key (PEM) registered for private_key_jwt.", "private_key")


_COLUMNS = (
    "fhir_base_url, environment, enabled, smart_client_id, client_auth_method,"
    " client_secret_encrypted, private_key_encrypted, pkce_mode, teams_organizer_id,"
    " department, organisation_name, smart_configuration, smart_checked_at"
)


async def create(
    ctx: ConfigContext, principal: Principal, data: IntegrationInput
) -> dict[str, Any]:
    url, found = await checked_smart_configuration(ctx, data.fhir_base_url)
    await _check_new_private_key(ctx, data)
    integration_id = uuid.uuid4()
    secret, key = _secrets(ctx, integration_id, data, None)
    async with ctx.pool.acquire() as conn, conn.transaction():
        tenant = await propagation.lock_tenant(conn, principal.tenant_id)
        try:
            row = await conn.fetchrow(
                f"INSERT INTO integrations (id, tenant_id, {_COLUMNS}) VALUES"  # noqa: S608
                " ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::jsonb, now())"
                " RETURNING *",
                integration_id,
                principal.tenant_id,
                url,
                data.environment,
                data.enabled,
                data.smart_client_id,
                data.client_auth_method,
                secret,
                key,
                data.pkce_mode,
                data.teams_organizer_id,
                data.department,
                data.organisation_name,
                found.model_dump_json(),
            )
        except asyncpg.UniqueViolationError:
            raise Refused(409, f"{url} is already configured.", "fhir_base_url") from None
        assert row is not None
        await propagation.publish_integration(conn, tenant, integration_id)
        view = public_view(ctx, row)
        await audit.record(
            conn, principal, "integration.created", "integration", str(integration_id),
            None, _audit_view(view),
        )  # fmt: skip
    return await get(ctx, principal.tenant_id, integration_id)


async def update(
    ctx: ConfigContext, principal: Principal, integration_id: uuid.UUID, data: IntegrationInput
) -> dict[str, Any]:
    current = await ctx.pool.fetchrow(
        "SELECT * FROM integrations WHERE id = $1 AND tenant_id = $2",
        integration_id,
        principal.tenant_id,
    )
    if current is None:
        raise not_found("FHIR base URL")
    url, found = await checked_smart_configuration(ctx, data.fhir_base_url)
    await _check_new_private_key(ctx, data)
    async with ctx.pool.acquire() as conn, conn.transaction():
        tenant = await propagation.lock_tenant(conn, principal.tenant_id)
        existing = await conn.fetchrow(
            "SELECT * FROM integrations WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            integration_id,
            principal.tenant_id,
        )
        if existing is None:
            raise not_found("FHIR base URL")
        secret, key = _secrets(ctx, integration_id, data, existing)
        try:
            row = await conn.fetchrow(
                f"UPDATE integrations SET ({_COLUMNS}, updated_at) ="  # noqa: S608
                " ($3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::jsonb, now(), now())"
                " WHERE id = $1 AND tenant_id = $2 RETURNING *",
                integration_id,
                principal.tenant_id,
                url,
                data.environment,
                data.enabled,
                data.smart_client_id,
                data.client_auth_method,
                secret,
                key,
                data.pkce_mode,
                data.teams_organizer_id,
                data.department,
                data.organisation_name,
                found.model_dump_json(),
            )
        except asyncpg.UniqueViolationError:
            raise Refused(409, f"{url} is already configured.", "fhir_base_url") from None
        assert row is not None
        await propagation.publish_integration(conn, tenant, integration_id)
        before, after = _audit_view(public_view(ctx, existing)), _audit_view(public_view(ctx, row))
        if data.client_secret is not None or data.private_key is not None:
            after["credential_replaced"] = True
        await audit.record(
            conn, principal, "integration.updated", "integration", str(integration_id),
            before, after,
        )  # fmt: skip
    return await get(ctx, principal.tenant_id, integration_id)


async def set_enabled(
    ctx: ConfigContext, principal: Principal, integration_id: uuid.UUID, enabled: bool
) -> dict[str, Any]:
    """Disabling must work even when the EHR is unreachable, so no SMART check here."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        tenant = await propagation.lock_tenant(conn, principal.tenant_id)
        existing = await conn.fetchrow(
            "SELECT * FROM integrations WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            integration_id,
            principal.tenant_id,
        )
        if existing is None:
            raise not_found("FHIR base URL")
        row = await conn.fetchrow(
            "UPDATE integrations SET enabled = $2, updated_at = now() WHERE id = $1 RETURNING *",
            integration_id,
            enabled,
        )
        assert row is not None
        await propagation.publish_integration(conn, tenant, integration_id)
        await audit.record(
            conn, principal, "integration.enabled" if enabled else "integration.disabled",
            "integration", str(integration_id),
            {"enabled": existing["enabled"]}, {"enabled": enabled},
        )  # fmt: skip
    return await get(ctx, principal.tenant_id, integration_id)


async def remove(ctx: ConfigContext, principal: Principal, integration_id: uuid.UUID) -> None:
    async with ctx.pool.acquire() as conn, conn.transaction():
        tenant = await propagation.lock_tenant(conn, principal.tenant_id)
        row = await conn.fetchrow(
            "DELETE FROM integrations WHERE id = $1 AND tenant_id = $2 RETURNING *",
            integration_id,
            principal.tenant_id,
        )
        if row is None:
            raise not_found("FHIR base URL")
        await propagation.publish_integration_removed(conn, tenant, row)
        await audit.record(
            conn, principal, "integration.removed", "integration", str(integration_id),
            _audit_view(public_view(ctx, row)), None,
        )  # fmt: skip

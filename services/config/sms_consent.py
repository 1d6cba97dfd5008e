"""SMS for the organisation: on only with both consents, and off the moment either goes.

(a) the vendor may send SMS to patients for the organisation;
(b) the organisation confirms it has the patients' consent.
Who ticked each box, and when, is kept; the audit log keeps the history.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict

from libs.common.portal_auth import Principal
from services.config import audit, propagation
from services.config.context import ConfigContext, Refused


class SmsInput(BaseModel):
    # Strict: each consent is a legal statement, so only true or false counts ("yes", 1 and
    # "on" are refused); the portal's form handler turns its checkboxes into booleans itself.
    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool
    vendor_may_send_sms: bool
    organisation_has_patient_consent: bool


def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def view(row: asyncpg.Record | None) -> dict[str, Any]:
    if row is None:
        return {
            "enabled": False,
            "vendor_may_send_sms": False,
            "vendor_consent_by": None,
            "vendor_consent_at": None,
            "organisation_has_patient_consent": False,
            "patient_consent_by": None,
            "patient_consent_at": None,
        }
    return {
        "enabled": propagation.sms_allowed(row),
        "vendor_may_send_sms": row["sms_vendor_consent_at"] is not None,
        "vendor_consent_by": row["sms_vendor_consent_by"],
        "vendor_consent_at": _when(row["sms_vendor_consent_at"]),
        "organisation_has_patient_consent": row["sms_patient_consent_at"] is not None,
        "patient_consent_by": row["sms_patient_consent_by"],
        "patient_consent_at": _when(row["sms_patient_consent_at"]),
    }


async def get(ctx: ConfigContext, tenant_id: str) -> dict[str, Any]:
    row = await ctx.pool.fetchrow("SELECT * FROM tenant_settings WHERE tenant_id = $1", tenant_id)
    return view(row)


async def save(ctx: ConfigContext, principal: Principal, data: SmsInput) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        current = await propagation.lock_tenant(conn, principal.tenant_id)
        before = view(current)
        withdrawing = (before["vendor_may_send_sms"] and not data.vendor_may_send_sms) or (
            before["organisation_has_patient_consent"] and not data.organisation_has_patient_consent
        )
        both = data.vendor_may_send_sms and data.organisation_has_patient_consent
        # Withdrawing a consent always succeeds and switches SMS off, even if the form still
        # asks for SMS on; only a plain "switch on" without both consents is refused.
        if data.enabled and not both and not withdrawing:
            raise Refused(422, "Tick both consent boxes to enable SMS.", "enabled")
        row = await conn.fetchrow(
            "UPDATE tenant_settings SET"
            " sms_vendor_consent_by = CASE WHEN $2 THEN coalesce(sms_vendor_consent_by, $4) END,"
            " sms_vendor_consent_at = CASE WHEN $2 THEN coalesce(sms_vendor_consent_at, now())"
            " END,"
            " sms_patient_consent_by = CASE WHEN $3 THEN coalesce(sms_patient_consent_by, $4) END,"
            " sms_patient_consent_at = CASE WHEN $3 THEN coalesce(sms_patient_consent_at, now())"
            " END,"
            " sms_enabled = $5, updated_at = now() WHERE tenant_id = $1 RETURNING *",
            principal.tenant_id,
            data.vendor_may_send_sms,
            data.organisation_has_patient_consent,
            principal.user_oid,
            data.enabled and both,
        )
        assert row is not None
        after = view(row)
        if after != before:
            await propagation.publish_tenant_integrations(conn, row)
            await audit.record(
                conn, principal, "sms.updated", "tenant", principal.tenant_id, before, after
            )
    return after

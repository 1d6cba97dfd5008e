"""The tenant's monthly allocation of completed appointments (licensing); analytics
reports against it, so it travels on the compacted `tenant-settings` topic."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from libs.common.portal_auth import Principal
from services.config import audit, propagation
from services.config.context import ConfigContext

MAX_ALLOCATION = 10_000_000


class AllocationInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    monthly_allocation: int = Field(ge=0, le=MAX_ALLOCATION, strict=True)


async def get(ctx: ConfigContext, tenant_id: str) -> dict[str, Any]:
    row = await ctx.pool.fetchrow(
        "SELECT monthly_allocation, allocation_config_version FROM tenant_settings"
        " WHERE tenant_id = $1",
        tenant_id,
    )
    return {
        "monthly_allocation": row["monthly_allocation"] if row else None,
        "config_version": row["allocation_config_version"] if row else 0,
    }


async def save(ctx: ConfigContext, principal: Principal, data: AllocationInput) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        current = await propagation.lock_tenant(conn, principal.tenant_id)
        await conn.execute(
            "UPDATE tenant_settings SET monthly_allocation = $2, updated_at = now()"
            " WHERE tenant_id = $1",
            principal.tenant_id,
            data.monthly_allocation,
        )
        version = await propagation.publish_tenant_settings(
            conn, principal.tenant_id, data.monthly_allocation
        )
        await audit.record(
            conn,
            principal,
            "allocation.updated",
            "tenant",
            principal.tenant_id,
            {"monthly_allocation": current["monthly_allocation"]},
            {"monthly_allocation": data.monthly_allocation},
        )
    return {"monthly_allocation": data.monthly_allocation, "config_version": version}

"""The audit log: who changed what, when, with before and after. Secrets never enter it."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from libs.common.portal_auth import Principal

if TYPE_CHECKING:
    from libs.common.db import Connection

MASK = "********"
_SECRET_WORDS = ("secret", "private_key", "password", "encrypted", "access_key")


def masked(values: dict[str, Any] | None) -> dict[str, Any] | None:
    """A defence in depth: callers pass public views, but any secret-like key is masked."""
    if values is None:
        return None
    out: dict[str, Any] = {}
    for key, value in values.items():
        if any(word in key.lower() for word in _SECRET_WORDS) and value not in (None, ""):
            out[key] = MASK
        elif isinstance(value, dict):
            out[key] = masked(value)
        else:
            out[key] = value
    return out


async def record(
    conn: Connection,
    principal: Principal,
    action: str,
    entity_type: str,
    entity_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (tenant_id, actor_oid, actor_upn, action, entity_type, entity_id,"
        " before, after) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb)",
        principal.tenant_id,
        principal.user_oid,
        principal.upn,
        action,
        entity_type,
        entity_id,
        None if before is None else orjson.dumps(masked(before)).decode(),
        None if after is None else orjson.dumps(masked(after)).decode(),
    )


def _entry(row: Any) -> dict[str, Any]:
    at: datetime = row["at"]
    return {
        "id": row["id"],
        "at": at.isoformat(),
        "actor_oid": row["actor_oid"],
        "actor_upn": row["actor_upn"],
        "action": row["action"],
        "entity_type": row["entity_type"],
        "entity_id": row["entity_id"],
        "before": orjson.loads(row["before"]) if row["before"] is not None else None,
        "after": orjson.loads(row["after"]) if row["after"] is not None else None,
    }


async def entries(
    conn: Connection, tenant_id: str, *, limit: int, before_id: int | None
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, at, actor_oid, actor_upn, action, entity_type, entity_id,"
        " before::text AS before, after::text AS after FROM audit_log"
        " WHERE tenant_id = $1 AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
        tenant_id,
        before_id,
        limit,
    )
    return [_entry(row) for row in rows]

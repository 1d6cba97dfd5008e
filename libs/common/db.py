"""asyncpg pool and per-service migrations.

Each service owns one schema. Its pool pins `search_path` to that schema, so service code
uses unqualified table names and cannot reach another service's tables by accident.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import structlog

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # What handlers receive: a pooled connection or a plain one; both speak the same API.
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

log = structlog.get_logger(__name__)

COMMON_MIGRATIONS = Path(__file__).parent / "migrations"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _checked_schema(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return schema


async def _keep_session(_conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Release without asyncpg's default reset query.

    By default every release sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL;`: a second round trip for each pooled query, which doubled the client CPU of
    a `pool.fetchval` (docs/performance.md, "Provider launch"). Nothing here leaves session
    state behind: search_path comes with the connection, advisory locks are transaction
    scoped, cursors live in transactions, and LISTENers UNLISTEN when they remove
    themselves. asyncpg still rolls back a transaction left open and drops the connection's
    notification callbacks before this runs.
    """


async def create_pool(
    dsn: str, schema: str, min_size: int = 1, max_size: int = 10, custom_plans: bool = False
) -> asyncpg.Pool:
    server_settings = {"search_path": _checked_schema(schema), "application_name": schema}
    if custom_plans:
        server_settings["plan_cache_mode"] = "force_custom_plan"
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=30,
        server_settings=server_settings,
        reset=_keep_session,
        # No idle-connection timer: asyncpg otherwise sets and cancels a timer around every
        # statement to close connections idle for 5 minutes; a pool of 10 may keep them.
        max_inactive_connection_lifetime=0,
    )
    assert pool is not None
    return pool


def _migration_files(directory: Path, prefix: str) -> list[tuple[str, Path]]:
    return [(f"{prefix}:{path.stem}", path) for path in sorted(directory.glob("*.sql"))]


async def migrate(
    pool: asyncpg.Pool,
    schema: str,
    service_migrations: Path,
    shared: Sequence[tuple[str, Path]] = (),
    parameters: Mapping[str, str] | None = None,
) -> list[str]:
    """Apply the common, the shared (e.g. portal sign-in) and then the service's migrations,
    once each, under an advisory lock. `parameters` are set for the migrations' transaction
    (`current_setting('ehr.<name>')`): what a migration needs from the service's settings.

    Safe to run from every replica at start: the lock serialises them and the ledger makes
    the second one a no-op.
    """
    schema = _checked_schema(schema)
    files = _migration_files(COMMON_MIGRATIONS, "common")
    for prefix, directory in shared:
        files += _migration_files(directory, prefix)
    files += _migration_files(service_migrations, schema)
    applied_now: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"migrate:{schema}")
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        for name, value in (parameters or {}).items():
            await conn.execute("SELECT set_config($1, $2, true)", f"ehr.{name}", value)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in files:
            if version in done:
                continue
            await conn.execute(path.read_text())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied_now.append(version)
    if applied_now:
        log.info("migrations applied", schema=schema, versions=applied_now)
    return applied_now

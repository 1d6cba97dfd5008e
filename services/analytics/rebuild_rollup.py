"""`python -m services.analytics.rebuild_rollup`: replaces every tenant's rollup with one
aggregated from its facts, a tenant per transaction, and checks it. Run it with analytics
scaled to zero (a consumer moving the rollup meanwhile would race the rebuild): after an
upgrade or a rollback across a release that changed how visits are filed (docs/deploy.md),
or to repair what `rollup.check` reports."""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from libs.common.db import create_pool
from services.analytics import rollup
from services.analytics.settings import AnalyticsSettings


async def rebuild_all(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Every tenant's rollup rebuilt; the problems `check` still finds, by tenant."""
    tenants = [
        str(r["tenant_id"])
        for r in await pool.fetch(
            "SELECT DISTINCT tenant_id FROM appointment_facts"
            " UNION SELECT DISTINCT tenant_id FROM daily_usage ORDER BY 1"
        )
    ]
    problems: dict[str, list[str]] = {}
    for n, tenant in enumerate(tenants, start=1):
        async with pool.acquire() as conn, conn.transaction():
            await rollup.rebuild(conn, tenant)
            problems[tenant] = await rollup.check(conn, tenant)
        print(f"rebuild: {n}/{len(tenants)} tenants", file=sys.stderr, flush=True)
    return problems


async def main() -> int:
    settings = AnalyticsSettings()
    pool = await create_pool(settings.database_url.get_secret_value(), settings.database_schema)
    try:
        problems = await rebuild_all(pool)
    finally:
        await pool.close()
    left = {tenant: found for tenant, found in problems.items() if found}
    print(f"rebuild: {len(problems)} tenants rebuilt, {len(left)} with differences left: {left}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

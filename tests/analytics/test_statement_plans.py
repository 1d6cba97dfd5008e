"""Analytics plans each poll's statements for the appointments they name."""

from __future__ import annotations

from libs.common.db import create_pool, migrate
from libs.common.portal_auth import PORTAL_MIGRATIONS
from libs.common.web import DB_POOL
from services.analytics.app import MIGRATIONS
from services.analytics.facts import _OBSERVATIONS
from tests.analytics.conftest import Analytics

KEYS = [f"apt-{i}" for i in range(300)]


async def _plans(database_url: str, custom_plans: bool) -> tuple[int, int]:
    """(generic, custom) plans Postgres made for the observations read, run as a poll runs
    it: the same prepared statement, ten times on one connection."""
    pool = await create_pool(database_url, "analytics", max_size=1, custom_plans=custom_plans)
    try:
        await migrate(pool, "analytics", MIGRATIONS, [PORTAL_MIGRATIONS])
        async with pool.acquire() as conn:
            for _ in range(10):
                await conn.fetch(_OBSERVATIONS, KEYS)
            row = await conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement = $1",
                _OBSERVATIONS,
            )
            assert row is not None
            return row["generic_plans"], row["custom_plans"]
    finally:
        await pool.close()


async def test_a_poll_read_is_planned_for_its_own_keys_every_time(database_url: str) -> None:
    """With custom plans the observations read never runs on a cached generic plan; without,
    Postgres switches to one after five runs (the plan that scanned every table whole)."""
    assert await _plans(database_url, custom_plans=True) == (0, 10)
    generic, _ = await _plans(database_url, custom_plans=False)
    assert generic > 0


async def test_the_analytics_service_pool_plans_each_statement(analytics: Analytics) -> None:
    """The running analytics service's pool has custom plans on, by default."""
    plan_mode = await analytics.app[DB_POOL].fetchval("SHOW plan_cache_mode")
    assert plan_mode == "force_custom_plan"

from __future__ import annotations

import asyncio

from libs.common.db import COMMON_MIGRATIONS, create_pool, migrate
from services.launch.app import MIGRATIONS as LAUNCH_MIGRATIONS
from services.notify.app import MIGRATIONS as NOTIFY_MIGRATIONS

COMMON = [f"common:{path.stem}" for path in sorted(COMMON_MIGRATIONS.glob("*.sql"))]


async def test_migrations_apply_once_and_are_idempotent(database_url: str) -> None:
    """The first run applies every migration; the second applies none."""
    pool = await create_pool(database_url, "launch")
    try:
        first = await migrate(pool, "launch", LAUNCH_MIGRATIONS)
        second = await migrate(pool, "launch", LAUNCH_MIGRATIONS)
        expected = COMMON + [
            f"launch:{path.stem}" for path in sorted(LAUNCH_MIGRATIONS.glob("*.sql"))
        ]
        assert first == expected
        assert second == []
    finally:
        await pool.close()


async def test_replicas_migrating_at_once_apply_each_migration_once(database_url: str) -> None:
    """Several replicas starting together serialise on the advisory lock."""
    pools = [await create_pool(database_url, "notify") for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(p, "notify", NOTIFY_MIGRATIONS) for p in pools))
        applied = [version for result in results for version in result]
        expected = COMMON + [
            f"notify:{path.stem}" for path in sorted(NOTIFY_MIGRATIONS.glob("*.sql"))
        ]
        assert sorted(applied) == sorted(expected)
    finally:
        for pool in pools:
            await pool.close()


async def test_each_service_gets_its_own_schema(database_url: str) -> None:
    """Service tables live in the service's schema and its pool sees only that schema."""
    launch = await create_pool(database_url, "launch")
    notify = await create_pool(database_url, "notify")
    try:
        await migrate(launch, "launch", LAUNCH_MIGRATIONS)
        await migrate(notify, "notify", NOTIFY_MIGRATIONS)
        schemas = await launch.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_name = 'appointments' ORDER BY 1"
        )
        assert [r["table_schema"] for r in schemas] == ["launch", "notify"]
        assert await launch.fetchval("SHOW search_path") == "launch"
        assert await notify.fetchval("SHOW search_path") == "notify"
    finally:
        await launch.close()
        await notify.close()

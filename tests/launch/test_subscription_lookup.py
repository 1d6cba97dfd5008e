"""Graph notifications find their visit by subscription id before the clientState is checked,
so anyone can make that lookup. Found by a review: unindexed, it read every appointment ever
booked (170 ms a request at 1,000,000 rows)."""

from __future__ import annotations

import asyncpg
import orjson

from tests.support.launch_harness import LaunchSystem

_LOOKUP = (
    "SELECT a.appointment_key, a.tenant_id, a.client_state_hash, a.organizer_id,"
    " a.meeting_id, i.ms_tenant_id FROM launch.appointments a"
    " LEFT JOIN launch.integrations i USING (integration_id) WHERE a.subscription_id = $1"
)


async def test_the_notifications_visit_lookup_reads_an_index(
    launch_system: LaunchSystem, database_url: str
) -> None:
    """The lookup by subscription id can use the appointments_subscription index."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {_LOOKUP}", "any-subscription")
    finally:
        await conn.close()
    assert "appointments_subscription" in orjson.dumps(orjson.loads(plan)).decode()

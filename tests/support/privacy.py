"""Finds patient-identifying data where it must not be: tables, topics, logs, metrics."""

from __future__ import annotations

import re
from typing import Any

import asyncpg

from sandbox.ehr import RunningEhr


def patient_markers(ehr: RunningEhr, tenant: str) -> list[str]:
    """Every sample patient's names, phone numbers (several formats), birth date and ids."""
    markers: set[str] = set()
    for patient in ehr.tenant(tenant).data.resources["Patient"].values():
        for name in patient.get("name", []):
            markers.update(
                filter(None, [name.get("family"), name.get("text"), *name.get("given", [])])
            )
        for telecom in patient.get("telecom", []):
            digits = re.sub(r"\D", "", str(telecom.get("value", "")))
            if len(digits) >= 10:
                national = digits[-10:]
                markers.update(
                    {
                        digits,
                        national,
                        f"({national[:3]}) {national[3:6]}-{national[6:]}",
                        f"{national[:3]}-{national[3:6]}-{national[6:]}",
                    }
                )
        if patient.get("birthDate"):
            markers.add(str(patient["birthDate"]))
        for identifier in patient.get("identifier", []):
            if identifier.get("value"):
                markers.add(str(identifier["value"]))
    return sorted(m for m in markers if len(m) >= 4)


def find_markers(text: str, markers: list[str]) -> list[str]:
    folded = text.lower()
    return [m for m in markers if m.lower() in folded]


async def scan_schema(
    conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any],
    schema: str,
    markers: list[str],
) -> list[str]:
    """`table.column: marker` for every stored value that contains a marker in clear."""
    hits = []
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = $1 AND table_type = 'BASE TABLE'",
        schema,
    )
    for table in tables:
        name = table["table_name"]
        rows = await conn.fetch(f'SELECT * FROM "{schema}"."{name}"')
        for row in rows:
            for column, value in row.items():
                text = (
                    bytes(value).decode("utf-8", "replace")
                    if isinstance(value, bytes | memoryview)
                    else str(value)
                )
                hits += [f"{name}.{column}: {m}" for m in find_markers(text, markers)]
    return hits

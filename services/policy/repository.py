"""Queries on the policy service's own schema: policies, cloud pairings and network mappings
(the read models of inventory, protected items and verdicts: read_model_repository.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import asyncpg

from services.policy.domain import NetworkFacts, PairingFacts

POLICY_COLUMNS = "policy_id, vault_id, name, settings, version, created_at, updated_at"
PAIRING_COLUMNS = (
    "p.pairing_id, p.vault_id, p.source_cloud_id, p.source_site, p.target_cloud_id,"
    " p.target_site, p.policy_id, p.created_at"
)
MAPPING_COLUMNS = (
    "m.mapping_id, m.vault_id, m.source_network_id, m.source_site, m.target_network_id,"
    " m.target_site, m.created_at, m.updated_at"
)


def _dict(row: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(row) if row is not None else None


def as_uuid(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None


async def lock_vault(conn: asyncpg.Connection, vault_id: uuid.UUID) -> None:
    """Serialise configuration changes of one vault (pairing and mapping rules span rows)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"policy:{vault_id}")


# ------------------------------------------------------------------------------ policies


async def insert_policy(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    policy_id: uuid.UUID,
    name: str,
    settings: dict[str, Any],
) -> dict[str, Any]:
    row = await conn.fetchrow(
        "INSERT INTO policies (policy_id, vault_id, name, settings) VALUES ($1,$2,$3,$4)"
        f" RETURNING {POLICY_COLUMNS}",
        policy_id,
        vault_id,
        name,
        settings,
    )
    return dict(row)


async def get_policy(
    conn: asyncpg.Connection, vault_id: uuid.UUID, ref: str, *, lock: bool = False
) -> dict[str, Any] | None:
    """A policy by id or by name."""
    pid = as_uuid(ref)
    where = "policy_id = $2" if pid is not None else "name = $2"
    row = await conn.fetchrow(
        f"SELECT {POLICY_COLUMNS} FROM policies WHERE vault_id = $1 AND {where}"
        f"{' FOR UPDATE' if lock else ''}",
        vault_id,
        pid if pid is not None else ref,
    )
    return _dict(row)


async def list_policies(conn: asyncpg.Connection, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {POLICY_COLUMNS} FROM policies WHERE vault_id = $1 ORDER BY created_at",
        vault_id,
    )
    return [dict(r) for r in rows]


async def update_policy(
    conn: asyncpg.Connection, policy_id: uuid.UUID, name: str, settings: dict[str, Any]
) -> dict[str, Any]:
    row = await conn.fetchrow(
        "UPDATE policies SET name = $2, settings = $3, version = version + 1, updated_at = now()"
        f" WHERE policy_id = $1 RETURNING {POLICY_COLUMNS}",
        policy_id,
        name,
        settings,
    )
    return dict(row)


async def delete_policy(conn: asyncpg.Connection, policy_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM policies WHERE policy_id = $1", policy_id)


# ------------------------------------------------------------------------------ pairings


def pairing_facts(row: dict[str, Any]) -> PairingFacts:
    return PairingFacts(
        pairing_id=row["pairing_id"],
        source_cloud_id=row["source_cloud_id"],
        source_site=row["source_site"],
        target_cloud_id=row["target_cloud_id"],
        target_site=row["target_site"],
        policy_id=row["policy_id"],
    )


_PAIRING_SELECT = (
    f"SELECT {PAIRING_COLUMNS}, pol.name AS policy_name, sc.name AS source_cloud_name,"
    " tc.name AS target_cloud_name FROM pairings p"
    " JOIN policies pol ON pol.policy_id = p.policy_id"
    " LEFT JOIN inv_clouds sc ON sc.vault_id = p.vault_id AND sc.cloud_id = p.source_cloud_id"
    " LEFT JOIN inv_clouds tc ON tc.vault_id = p.vault_id AND tc.cloud_id = p.target_cloud_id"
)


async def list_pairings(
    conn: asyncpg.Connection, vault_id: uuid.UUID, policy_id: uuid.UUID | None = None
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"{_PAIRING_SELECT} WHERE p.vault_id = $1 AND ($2::uuid IS NULL OR p.policy_id = $2)"
        " ORDER BY p.created_at",
        vault_id,
        policy_id,
    )
    return [dict(r) for r in rows]


async def get_pairing(
    conn: asyncpg.Connection, vault_id: uuid.UUID, pairing_id: uuid.UUID
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"{_PAIRING_SELECT} WHERE p.vault_id = $1 AND p.pairing_id = $2", vault_id, pairing_id
    )
    return _dict(row)


async def pairing_of_source(
    conn: asyncpg.Connection, vault_id: uuid.UUID, cloud_id: str
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"{_PAIRING_SELECT} WHERE p.vault_id = $1 AND p.source_cloud_id = $2", vault_id, cloud_id
    )
    return _dict(row)


async def insert_pairing(conn: asyncpg.Connection, vault_id: uuid.UUID, p: PairingFacts) -> None:
    await conn.execute(
        "INSERT INTO pairings (pairing_id, vault_id, source_cloud_id, source_site,"
        " target_cloud_id, target_site, policy_id) VALUES ($1,$2,$3,$4,$5,$6,$7)",
        p.pairing_id,
        vault_id,
        p.source_cloud_id,
        p.source_site,
        p.target_cloud_id,
        p.target_site,
        p.policy_id,
    )


async def delete_pairing(conn: asyncpg.Connection, pairing_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM pairings WHERE pairing_id = $1", pairing_id)


# ------------------------------------------------------------------------------ mappings


_MAPPING_SELECT = (
    f"SELECT {MAPPING_COLUMNS}, sn.name AS source_network_name,"
    " tn.name AS target_network_name FROM network_mappings m"
    " LEFT JOIN inv_networks sn ON sn.vault_id = m.vault_id"
    " AND sn.network_id = m.source_network_id"
    " LEFT JOIN inv_networks tn ON tn.vault_id = m.vault_id"
    " AND tn.network_id = m.target_network_id"
)


async def list_mappings(conn: asyncpg.Connection, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"{_MAPPING_SELECT} WHERE m.vault_id = $1 ORDER BY m.created_at", vault_id
    )
    return [dict(r) for r in rows]


async def get_mapping(
    conn: asyncpg.Connection, vault_id: uuid.UUID, mapping_id: uuid.UUID
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"{_MAPPING_SELECT} WHERE m.vault_id = $1 AND m.mapping_id = $2", vault_id, mapping_id
    )
    return _dict(row)


async def mapping_of_source(
    conn: asyncpg.Connection, vault_id: uuid.UUID, network_id: str
) -> uuid.UUID | None:
    found: uuid.UUID | None = await conn.fetchval(
        "SELECT mapping_id FROM network_mappings WHERE vault_id = $1 AND source_network_id = $2",
        vault_id,
        network_id,
    )
    return found


async def insert_mapping(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    mapping_id: uuid.UUID,
    source: NetworkFacts,
    target: NetworkFacts,
) -> None:
    await conn.execute(
        "INSERT INTO network_mappings (mapping_id, vault_id, source_network_id, source_site,"
        " target_network_id, target_site) VALUES ($1,$2,$3,$4,$5,$6)",
        mapping_id,
        vault_id,
        source.network_id,
        source.site,
        target.network_id,
        target.site,
    )


async def retarget_mapping(
    conn: asyncpg.Connection, mapping_id: uuid.UUID, target: NetworkFacts
) -> None:
    await conn.execute(
        "UPDATE network_mappings SET target_network_id = $2, target_site = $3, updated_at = now()"
        " WHERE mapping_id = $1",
        mapping_id,
        target.network_id,
        target.site,
    )


async def delete_mapping(conn: asyncpg.Connection, mapping_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM network_mappings WHERE mapping_id = $1", mapping_id)


async def mapped_networks(
    conn: asyncpg.Connection, vault_id: uuid.UUID, network_ids: Iterable[str]
) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT source_network_id, target_network_id FROM network_mappings"
        " WHERE vault_id = $1 AND source_network_id = ANY($2::text[])",
        vault_id,
        list(network_ids),
    )
    return {r["source_network_id"]: r["target_network_id"] for r in rows}

"""The failover service's read models, kept from other services' events: protected items and
their retained points, VMs, networks, network mappings, clouds and known producers (agents)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from services.failover.domain.items import ItemRow
from services.failover.domain.nics import NetworkMapping
from services.failover.domain.points import RetainedPoints
from services.failover.repository import Conn, from_record


async def upsert_item(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    *,
    vm_id: str,
    vm_name: str,
    source_cloud_id: str,
    target_cloud_id: str,
    pairing_id: uuid.UUID,
    source_agent_id: uuid.UUID,
) -> None:
    """A protected item (again): its source agent may change; an item of another vault is
    left alone."""
    await conn.execute(
        "INSERT INTO rm_items (item_id, vault_id, vm_id, vm_name, source_cloud_id,"
        " target_cloud_id, pairing_id, source_agent_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
        " ON CONFLICT (item_id) DO UPDATE SET source_agent_id = EXCLUDED.source_agent_id,"
        " active = true, updated_at = now() WHERE rm_items.vault_id = EXCLUDED.vault_id",
        item_id,
        vault_id,
        vm_id,
        vm_name,
        source_cloud_id,
        target_cloud_id,
        pairing_id,
        source_agent_id,
    )


async def deactivate_item(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID
) -> None:
    await conn.execute(
        "UPDATE rm_items SET active = false WHERE item_id = $1 AND vault_id = $2",
        item_id,
        vault_id,
    )


async def set_item_state(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID, state: str, health: str
) -> None:
    await conn.execute(
        "UPDATE rm_items SET state = $2, health = $3, updated_at = now()"
        " WHERE item_id = $1 AND vault_id = $4",
        item_id,
        state,
        health,
        vault_id,
    )


async def record_point(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    cycle_seq: int,
    source_time: datetime,
    app_consistent: bool,
) -> None:
    """A new recovery point: the item's latest (and latest app-consistent) move forward only."""
    await conn.execute(
        "UPDATE rm_items SET latest_source_time = CASE WHEN coalesce(latest_seq, 0) < $2"
        "  THEN $3 ELSE latest_source_time END,"
        " latest_seq = greatest(coalesce(latest_seq, 0), $2),"
        " latest_app_seq = CASE WHEN $4 THEN greatest(coalesce(latest_app_seq, 0), $2)"
        "  ELSE latest_app_seq END, updated_at = now() WHERE item_id = $1 AND vault_id = $5",
        item_id,
        cycle_seq,
        source_time,
        app_consistent,
        vault_id,
    )
    await conn.execute(
        "INSERT INTO rm_points (item_id, vault_id, cycle_seq, app_consistent, source_time)"
        " SELECT $1, $2, $3, $4, $5 WHERE EXISTS"
        "  (SELECT 1 FROM rm_items WHERE item_id = $1 AND vault_id = $2)"
        " ON CONFLICT (item_id, cycle_seq) DO NOTHING",
        item_id,
        vault_id,
        cycle_seq,
        app_consistent,
        source_time,
    )


async def prune_points(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID, cycle_seqs: list[int]
) -> None:
    """Retention removed these points: they leave the item's retained points."""
    await conn.execute(
        "DELETE FROM rm_points WHERE item_id = $1 AND vault_id = $2"
        " AND cycle_seq = ANY($3::bigint[])",
        item_id,
        vault_id,
        cycle_seqs,
    )


async def retained_points(conn: Conn, item_id: uuid.UUID) -> RetainedPoints:
    rows = await conn.fetch(
        "SELECT cycle_seq, app_consistent FROM rm_points WHERE item_id = $1", item_id
    )
    return RetainedPoints(
        seqs=frozenset(r["cycle_seq"] for r in rows),
        app_seqs=frozenset(r["cycle_seq"] for r in rows if r["app_consistent"]),
    )


async def remove_vm(conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str, site: str) -> None:
    await conn.execute(
        "UPDATE rm_vms SET removed = true WHERE vault_id = $1 AND vm_id = $2 AND site = $3",
        vault_id,
        vm_id,
        site,
    )


async def upsert_vm(
    conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str, site: str, vm: dict[str, Any]
) -> None:
    """A recovery VM keeps its source's id: the primary's record stays the one we use for the
    source disks and NICs; only an item's own source site may overwrite it."""
    await conn.execute(
        "INSERT INTO rm_vms (vm_id, vault_id, site, vm) VALUES ($1,$2,$3,$4)"
        " ON CONFLICT (vault_id, vm_id) DO UPDATE SET vm = EXCLUDED.vm, site = EXCLUDED.site,"
        " removed = false WHERE rm_vms.site = EXCLUDED.site OR rm_vms.removed",
        vm_id,
        vault_id,
        site,
        vm,
    )


async def remove_network(conn: asyncpg.Connection, vault_id: uuid.UUID, network_id: str) -> None:
    await conn.execute(
        "UPDATE rm_networks SET removed = true WHERE vault_id = $1 AND network_id = $2",
        vault_id,
        network_id,
    )


async def upsert_network(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    network_id: str,
    site: str,
    network: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO rm_networks (network_id, vault_id, site, network) VALUES ($1,$2,$3,$4)"
        " ON CONFLICT (vault_id, network_id) DO UPDATE SET network = EXCLUDED.network,"
        " site = EXCLUDED.site, removed = false",
        network_id,
        vault_id,
        site,
        network,
    )


async def upsert_cloud(
    conn: asyncpg.Connection, vault_id: uuid.UUID, cloud_id: str, site: str
) -> None:
    await conn.execute(
        "INSERT INTO rm_clouds (cloud_id, vault_id, site) VALUES ($1,$2,$3)"
        " ON CONFLICT (vault_id, cloud_id) DO UPDATE SET site = EXCLUDED.site",
        cloud_id,
        vault_id,
        site,
    )


async def upsert_mapping(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    mapping_id: uuid.UUID,
    source_network_id: str,
    target_network_id: str,
    removed: bool,
) -> None:
    await conn.execute(
        "INSERT INTO rm_mappings (mapping_id, vault_id, source_network_id, target_network_id,"
        " removed) VALUES ($1,$2,$3,$4,$5) ON CONFLICT (vault_id, mapping_id) DO UPDATE SET"
        " target_network_id = EXCLUDED.target_network_id, removed = EXCLUDED.removed",
        mapping_id,
        vault_id,
        source_network_id,
        target_network_id,
        removed,
    )


async def known_items(conn: Conn, vault_id: uuid.UUID, item_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Those of `item_ids` that are protected items of the vault."""
    rows = await conn.fetch(
        "SELECT item_id FROM rm_items WHERE vault_id = $1 AND item_id = ANY($2::uuid[])",
        vault_id,
        item_ids,
    )
    return {r["item_id"] for r in rows}


async def item(conn: Conn, item_id: uuid.UUID) -> ItemRow | None:
    row = await conn.fetchrow("SELECT * FROM rm_items WHERE item_id = $1", item_id)
    return from_record(ItemRow, row) if row else None


async def items(conn: Conn, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT i.*, f.state AS failover_state FROM rm_items i"
        " LEFT JOIN item_failover f ON f.item_id = i.item_id"
        " WHERE i.vault_id = $1 ORDER BY i.vm_name, i.item_id",
        vault_id,
    )
    return [dict(r) for r in rows]


async def vm(conn: Conn, vault_id: uuid.UUID, vm_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT * FROM rm_vms WHERE vault_id = $1 AND vm_id = $2", vault_id, vm_id
    )
    return dict(row) if row else None


async def networks(conn: Conn, vault_id: uuid.UUID) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT network_id, site, network FROM rm_networks WHERE vault_id = $1 AND NOT removed",
        vault_id,
    )
    return {r["network_id"]: dict(r) for r in rows}


async def mappings(conn: Conn, vault_id: uuid.UUID) -> list[NetworkMapping]:
    rows = await conn.fetch(
        "SELECT * FROM rm_mappings WHERE vault_id = $1 AND NOT removed", vault_id
    )
    return [from_record(NetworkMapping, r) for r in rows]


async def cloud_site(conn: Conn, vault_id: uuid.UUID, cloud_id: str) -> str | None:
    site: str | None = await conn.fetchval(
        "SELECT site FROM rm_clouds WHERE vault_id = $1 AND cloud_id = $2", vault_id, cloud_id
    )
    return site


async def producer(conn: Conn, producer_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM known_producers WHERE producer_id = $1", producer_id)
    return dict(row) if row else None


async def agents_at(conn: Conn, vault_id: uuid.UUID, site: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT * FROM known_producers WHERE vault_id = $1 AND site = $2 AND kind = 'agent'"
        " AND active ORDER BY (connection_state IS DISTINCT FROM 'Connected'), name",
        vault_id,
        site,
    )
    return [dict(r) for r in rows]


async def used_ips(conn: Conn, vault_id: uuid.UUID) -> set[str]:
    """Addresses held by discovered VMs and by recovery VMs this service placed."""
    used: set[str] = set()
    for r in await conn.fetch(
        "SELECT vm FROM rm_vms WHERE vault_id = $1 AND NOT removed", vault_id
    ):
        used.update(n["ip_address"] for n in r["vm"].get("nics", []) if n.get("ip_address"))
    for r in await conn.fetch("SELECT info FROM item_failover WHERE vault_id = $1", vault_id):
        used.update(n["ip_address"] for n in r["info"].get("nics", []) if n.get("ip_address"))
    return used

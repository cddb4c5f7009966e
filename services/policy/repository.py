"""Queries on the policy service's own schema: policies, pairings, network mappings and the
read models (inventory, protected items)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import asyncpg

from services.policy.domain import CloudFacts, NetworkFacts, PairingFacts, ProviderFacts
from shared.schemas import inventory as inv

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


# ------------------------------------------------------------------------------ read models


async def get_cloud(
    conn: asyncpg.Connection, vault_id: uuid.UUID, cloud_id: str
) -> CloudFacts | None:
    row = await conn.fetchrow(
        "SELECT cloud_id, name, site, provider_id, host_groups, capacity_vms FROM inv_clouds"
        " WHERE vault_id = $1 AND cloud_id = $2",
        vault_id,
        cloud_id,
    )
    if row is None:
        return None
    return CloudFacts(
        cloud_id=row["cloud_id"],
        name=row["name"],
        site=row["site"],
        provider_id=row["provider_id"],
        host_groups=tuple(row["host_groups"]),
        capacity_vms=row["capacity_vms"],
    )


async def host_os_versions(
    conn: asyncpg.Connection, vault_id: uuid.UUID, cloud_ids: Iterable[str]
) -> set[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT os_version FROM inv_hosts WHERE vault_id = $1"
        " AND cloud_id = ANY($2::text[])",
        vault_id,
        list(cloud_ids),
    )
    return {r["os_version"] for r in rows}


async def get_vm(conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str) -> inv.Vm | None:
    data = await conn.fetchval(
        "SELECT data FROM inv_vms WHERE vault_id = $1 AND vm_id = $2", vault_id, vm_id
    )
    return inv.Vm.model_validate(data) if data is not None else None


async def get_network(
    conn: asyncpg.Connection, vault_id: uuid.UUID, network_id: str
) -> NetworkFacts | None:
    row = await conn.fetchrow(
        "SELECT network_id, name, site FROM inv_networks WHERE vault_id = $1 AND network_id = $2",
        vault_id,
        network_id,
    )
    return NetworkFacts(row["network_id"], row["name"], row["site"]) if row else None


async def site_provider(
    conn: asyncpg.Connection, vault_id: uuid.UUID, provider_id: uuid.UUID | None, site: str
) -> ProviderFacts | None:
    """The site's provider from the registration read model: the cloud's own provider, else
    the active provider registered for the site."""
    row = await conn.fetchrow(
        "SELECT producer_id, name, site, active, connection_state FROM known_producers"
        " WHERE vault_id = $1 AND kind = 'provider' AND (producer_id = $2 OR site = $3)"
        " ORDER BY (producer_id = $2) DESC NULLS LAST, active DESC LIMIT 1",
        vault_id,
        provider_id,
        site,
    )
    if row is None:
        return None
    return ProviderFacts(
        row["producer_id"], row["name"], row["site"], row["active"], row["connection_state"]
    )


async def upsert_cloud(
    conn: asyncpg.Connection, vault_id: uuid.UUID, provider_id: uuid.UUID, site: str, c: inv.Cloud
) -> None:
    await conn.execute(
        "INSERT INTO inv_clouds (vault_id, cloud_id, provider_id, site, name, host_groups,"
        " capacity_vms, data) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
        " ON CONFLICT (vault_id, cloud_id) DO UPDATE SET provider_id = EXCLUDED.provider_id,"
        " site = EXCLUDED.site, name = EXCLUDED.name, host_groups = EXCLUDED.host_groups,"
        " capacity_vms = EXCLUDED.capacity_vms, data = EXCLUDED.data, updated_at = now()",
        vault_id,
        c.cloud_id,
        provider_id,
        site,
        c.name,
        list(c.host_groups),
        c.capacity_vms,
        c.model_dump(mode="json"),
    )


async def upsert_host(
    conn: asyncpg.Connection, vault_id: uuid.UUID, provider_id: uuid.UUID, site: str, h: inv.Host
) -> None:
    await conn.execute(
        "INSERT INTO inv_hosts (vault_id, host_id, provider_id, site, cloud_id, os_version, data)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7)"
        " ON CONFLICT (vault_id, host_id) DO UPDATE SET provider_id = EXCLUDED.provider_id,"
        " site = EXCLUDED.site, cloud_id = EXCLUDED.cloud_id, os_version = EXCLUDED.os_version,"
        " data = EXCLUDED.data, updated_at = now()",
        vault_id,
        h.host_id,
        provider_id,
        site,
        h.cloud_id,
        h.os_version,
        h.model_dump(mode="json"),
    )


async def upsert_vm(
    conn: asyncpg.Connection, vault_id: uuid.UUID, provider_id: uuid.UUID, site: str, vm: inv.Vm
) -> None:
    await conn.execute(
        "INSERT INTO inv_vms (vault_id, vm_id, provider_id, site, cloud_id, data)"
        " VALUES ($1,$2,$3,$4,$5,$6)"
        " ON CONFLICT (vault_id, vm_id) DO UPDATE SET provider_id = EXCLUDED.provider_id,"
        " site = EXCLUDED.site, cloud_id = EXCLUDED.cloud_id, data = EXCLUDED.data,"
        " updated_at = now()",
        vault_id,
        vm.vm_id,
        provider_id,
        site,
        vm.cloud_id,
        vm.model_dump(mode="json"),
    )


async def upsert_network(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    provider_id: uuid.UUID,
    site: str,
    n: inv.VmNetwork,
) -> None:
    await conn.execute(
        "INSERT INTO inv_networks (vault_id, network_id, provider_id, site, name, data)"
        " VALUES ($1,$2,$3,$4,$5,$6)"
        " ON CONFLICT (vault_id, network_id) DO UPDATE SET provider_id = EXCLUDED.provider_id,"
        " site = EXCLUDED.site, name = EXCLUDED.name, data = EXCLUDED.data, updated_at = now()",
        vault_id,
        n.network_id,
        provider_id,
        site,
        n.name,
        n.model_dump(mode="json"),
    )


_INVENTORY_TABLES = {
    "cloud": ("inv_clouds", "cloud_id"),
    "host": ("inv_hosts", "host_id"),
    "vm": ("inv_vms", "vm_id"),
    "network": ("inv_networks", "network_id"),
}


async def remove_inventory_object(
    conn: asyncpg.Connection, vault_id: uuid.UUID, kind: str, object_id: str
) -> None:
    table, column = _INVENTORY_TABLES[kind]
    await conn.execute(
        f"DELETE FROM {table} WHERE vault_id = $1 AND {column} = $2", vault_id, object_id
    )


# ------------------------------------------------------------------------------ protected items


async def upsert_protected_item(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    vm_id: str,
    source_cloud_id: str,
    target_cloud_id: str,
    pairing_id: uuid.UUID | None = None,
    state: str = "protected",
) -> None:
    await conn.execute(
        "INSERT INTO protected_items (vault_id, vm_id, source_cloud_id, target_cloud_id,"
        " pairing_id, state) VALUES ($1,$2,$3,$4,$5,$6)"
        " ON CONFLICT (vault_id, vm_id) DO UPDATE SET source_cloud_id = EXCLUDED.source_cloud_id,"
        " target_cloud_id = EXCLUDED.target_cloud_id, pairing_id = EXCLUDED.pairing_id,"
        " state = EXCLUDED.state, updated_at = now()",
        vault_id,
        vm_id,
        source_cloud_id,
        target_cloud_id,
        pairing_id,
        state,
    )


async def remove_protected_item(
    conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str
) -> str | None:
    """Forget a protected VM; returns the target cloud it was protected into, if known."""
    target: str | None = await conn.fetchval(
        "DELETE FROM protected_items WHERE vault_id = $1 AND vm_id = $2 RETURNING target_cloud_id",
        vault_id,
        vm_id,
    )
    return target


async def protected_in_source(conn: asyncpg.Connection, vault_id: uuid.UUID, cloud_id: str) -> int:
    """Protected items whose VM is in (or was protected from) the source cloud."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM protected_items pi WHERE pi.vault_id = $1 AND"
        " (pi.source_cloud_id = $2 OR EXISTS (SELECT 1 FROM inv_vms v WHERE v.vault_id ="
        " pi.vault_id AND v.vm_id = pi.vm_id AND v.cloud_id = $2))",
        vault_id,
        cloud_id,
    )
    return count


async def protected_in_target(conn: asyncpg.Connection, vault_id: uuid.UUID, cloud_id: str) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM protected_items WHERE vault_id = $1 AND target_cloud_id = $2",
        vault_id,
        cloud_id,
    )
    return count


async def is_protected(conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str) -> bool:
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM protected_items WHERE vault_id = $1 AND vm_id = $2)",
        vault_id,
        vm_id,
    )
    return found


# ------------------------------------------------------------------------------ verdicts


async def vm_ids(conn: asyncpg.Connection, vault_id: uuid.UUID) -> list[str]:
    """Every VM of the vault's inventory, and every VM whose last verdict passed (a VM that left
    the inventory gets one more verdict: not found)."""
    rows = await conn.fetch(
        "SELECT vm_id FROM inv_vms WHERE vault_id = $1 UNION"
        " SELECT vm_id FROM prerequisite_verdicts WHERE vault_id = $1 AND ok ORDER BY 1",
        vault_id,
    )
    return [r["vm_id"] for r in rows]


async def vm_ids_in_cloud(
    conn: asyncpg.Connection, vault_id: uuid.UUID, cloud_id: str
) -> list[str]:
    rows = await conn.fetch(
        "SELECT vm_id FROM inv_vms WHERE vault_id = $1 AND cloud_id = $2 ORDER BY 1",
        vault_id,
        cloud_id,
    )
    return [r["vm_id"] for r in rows]


async def vm_ids_paired_into(
    conn: asyncpg.Connection, vault_id: uuid.UUID, target_cloud_id: str
) -> list[str]:
    """VMs whose cloud is paired with `target_cloud_id` (its capacity is in their verdict)."""
    rows = await conn.fetch(
        "SELECT v.vm_id FROM inv_vms v JOIN pairings p ON p.vault_id = v.vault_id"
        " AND p.source_cloud_id = v.cloud_id WHERE v.vault_id = $1 AND p.target_cloud_id = $2"
        " ORDER BY 1",
        vault_id,
        target_cloud_id,
    )
    return [r["vm_id"] for r in rows]


async def vaults_with_vms(conn: asyncpg.Connection) -> list[uuid.UUID]:
    rows = await conn.fetch(
        "SELECT vault_id FROM inv_vms UNION SELECT vault_id FROM prerequisite_verdicts"
    )
    return [r["vault_id"] for r in rows]


async def store_verdict(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    vm_id: str,
    ok: bool,
    checks: list[dict[str, str]],
) -> int | None:
    """Record a VM's verdict; returns its new revision, or None when it equals the last one."""
    revision: int | None = await conn.fetchval(
        "INSERT INTO prerequisite_verdicts AS v (vault_id, vm_id, ok, checks, revision)"
        " VALUES ($1, $2, $3, $4, 1) ON CONFLICT (vault_id, vm_id) DO UPDATE SET"
        " ok = EXCLUDED.ok, checks = EXCLUDED.checks, revision = v.revision + 1,"
        " updated_at = now() WHERE v.checks IS DISTINCT FROM EXCLUDED.checks"
        " OR v.ok IS DISTINCT FROM EXCLUDED.ok RETURNING revision",
        vault_id,
        vm_id,
        ok,
        checks,
    )
    return revision

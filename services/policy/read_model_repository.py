"""Queries on the policy service's read models (inventory objects, protected items, from the
other services' events) and the VM prerequisite verdicts computed over them."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import asyncpg

from services.policy.domain import CloudFacts, NetworkFacts, ProviderFacts
from shared.schemas import inventory as inv

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

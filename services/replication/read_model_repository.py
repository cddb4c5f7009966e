"""Queries on the read models this service keeps of other services' events (VMs, hosts,
policies, pairings, prerequisite verdicts, known agents): what enabling protection and reverse
replication read."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from services.replication import domain
from shared.schemas.policy import PrerequisitesEvaluated


async def upsert_vm(
    conn: asyncpg.Connection, vault_id: uuid.UUID, site: str, vm: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO rm_vms (vm_id, vault_id, name, site, cloud_id, host_id, vm)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (vault_id, vm_id) DO UPDATE SET name = $3,"
        " site = $4, cloud_id = $5, host_id = $6, vm = $7, removed = false",
        vm["vm_id"],
        vault_id,
        vm["name"],
        site,
        vm["cloud_id"],
        vm["host_id"],
        vm,
    )


async def remove_vm(conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str) -> None:
    await conn.execute(
        "UPDATE rm_vms SET removed = true WHERE vault_id = $1 AND vm_id = $2", vault_id, vm_id
    )


async def upsert_host(
    conn: asyncpg.Connection, vault_id: uuid.UUID, site: str, host: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO rm_hosts (host_id, vault_id, name, site, cloud_id) VALUES ($1,$2,$3,$4,$5)"
        " ON CONFLICT (vault_id, host_id) DO UPDATE SET name = $3, site = $4, cloud_id = $5,"
        " removed = false",
        host["host_id"],
        vault_id,
        host["name"],
        site,
        host["cloud_id"],
    )


async def remove_host(conn: asyncpg.Connection, vault_id: uuid.UUID, host_id: str) -> None:
    await conn.execute(
        "UPDATE rm_hosts SET removed = true WHERE vault_id = $1 AND host_id = $2",
        vault_id,
        host_id,
    )


async def upsert_policy(
    conn: asyncpg.Connection, vault_id: uuid.UUID, policy: dict[str, Any], deleted: bool
) -> None:
    await conn.execute(
        "INSERT INTO rm_policies (policy_id, vault_id, name, version, settings, deleted)"
        " VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (vault_id, policy_id) DO UPDATE SET name = $3,"
        " version = $4, settings = $5, deleted = $6 WHERE rm_policies.version <= $4",
        uuid.UUID(str(policy["policy_id"])),
        vault_id,
        policy["name"],
        policy["version"],
        policy["settings"],
        deleted,
    )


async def upsert_pairing(
    conn: asyncpg.Connection, vault_id: uuid.UUID, pairing: dict[str, Any], removed: bool
) -> None:
    await conn.execute(
        "INSERT INTO rm_pairings (pairing_id, vault_id, source_cloud_id, source_site,"
        " target_cloud_id, target_site, policy_id, removed) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
        " ON CONFLICT (vault_id, pairing_id) DO UPDATE SET removed = $8, policy_id = $7",
        uuid.UUID(str(pairing["pairing_id"])),
        vault_id,
        pairing["source_cloud_id"],
        pairing["source_site"],
        pairing["target_cloud_id"],
        pairing["target_site"],
        uuid.UUID(str(pairing["policy_id"])),
        removed,
    )


async def upsert_prerequisites(
    conn: asyncpg.Connection, vault_id: uuid.UUID, verdict: PrerequisitesEvaluated
) -> None:
    """Keep the highest revision of a VM's prerequisite verdict."""
    await conn.execute(
        "INSERT INTO rm_prerequisites AS p (vault_id, vm_id, ok, checks, revision)"
        " VALUES ($1,$2,$3,$4,$5) ON CONFLICT (vault_id, vm_id) DO UPDATE SET ok = EXCLUDED.ok,"
        " checks = EXCLUDED.checks, revision = EXCLUDED.revision, updated_at = now()"
        " WHERE p.revision < EXCLUDED.revision",
        vault_id,
        verdict.vm_id,
        verdict.ok,
        [c.model_dump(mode="json") for c in verdict.checks],
        verdict.revision,
    )


async def prerequisites_of(
    conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str
) -> domain.PrerequisiteVerdict | None:
    row = await conn.fetchrow(
        "SELECT ok, checks FROM rm_prerequisites WHERE vault_id = $1 AND vm_id = $2",
        vault_id,
        vm_id,
    )
    if row is None:
        return None
    return domain.PrerequisiteVerdict(
        ok=row["ok"],
        failed=tuple(
            domain.FailedCheck(c["rule"], c["message"])
            for c in row["checks"]
            if c["status"] == "fail"
        ),
    )


async def protection_context(
    conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str
) -> dict[str, Any] | None:
    """VM, its host, the pairing of its cloud and that pairing's policy (None if any is
    missing)."""
    row = await conn.fetchrow(
        "SELECT v.vm, v.name AS vm_name, v.site, h.name AS host_name, p.pairing_id,"
        " p.target_cloud_id, p.target_site, pol.policy_id, pol.settings"
        " FROM rm_vms v JOIN rm_hosts h ON h.vault_id = v.vault_id AND h.host_id = v.host_id"
        "  AND NOT h.removed"
        " JOIN rm_pairings p ON p.vault_id = v.vault_id AND p.source_cloud_id = v.cloud_id"
        "  AND NOT p.removed"
        " JOIN rm_policies pol ON pol.vault_id = p.vault_id AND pol.policy_id = p.policy_id"
        "  AND NOT pol.deleted"
        " WHERE v.vm_id = $1 AND v.vault_id = $2 AND NOT v.removed",
        vm_id,
        vault_id,
    )
    return dict(row) if row else None


async def agent_named(
    conn: asyncpg.Connection, vault_id: uuid.UUID, name: str
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT producer_id, connection_state, site FROM known_producers"
        " WHERE vault_id = $1 AND kind = 'agent' AND name = $2 AND active",
        vault_id,
        name,
    )
    return dict(row) if row else None


async def recovery_agent(
    conn: asyncpg.Connection, vault_id: uuid.UUID, site: str
) -> uuid.UUID | None:
    """The host agent of `site` that keeps a new item's replica (the first by name)."""
    found: uuid.UUID | None = await conn.fetchval(
        "SELECT producer_id FROM known_producers WHERE vault_id = $1 AND kind = 'agent'"
        " AND site = $2 AND active ORDER BY name LIMIT 1",
        vault_id,
        site,
    )
    return found


async def policy_settings(
    conn: asyncpg.Connection, vault_id: uuid.UUID, policy_id: uuid.UUID
) -> dict[str, Any]:
    settings = await conn.fetchval(
        "SELECT settings FROM rm_policies WHERE vault_id = $1 AND policy_id = $2",
        vault_id,
        policy_id,
    )
    return dict(settings or {})


async def pairing_source_cloud(
    conn: asyncpg.Connection, vault_id: uuid.UUID, pairing_id: uuid.UUID
) -> str | None:
    value = await conn.fetchval(
        "SELECT source_cloud_id FROM rm_pairings WHERE vault_id = $1 AND pairing_id = $2",
        vault_id,
        pairing_id,
    )
    return str(value) if value is not None else None


async def vm_cloud(conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str) -> str | None:
    value = await conn.fetchval(
        "SELECT cloud_id FROM rm_vms WHERE vault_id = $1 AND vm_id = $2", vault_id, vm_id
    )
    return str(value) if value is not None else None


async def agent_by_id(conn: asyncpg.Connection, producer_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT producer_id, vault_id, name, site, active FROM known_producers"
        " WHERE producer_id = $1 AND kind = 'agent'",
        producer_id,
    )
    return dict(row) if row else None

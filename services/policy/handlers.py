"""Policy handlers: load the facts, decide (domain), persist + outbox in one transaction; and
the consumer handlers that keep the inventory and protected-item read models."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.policy import domain
from services.policy import read_model_repository as reads
from services.policy import repository as repo
from shared import outbox
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming
from shared.schemas import inventory as inv
from shared.schemas import policy as ev
from shared.schemas.envelope import EventPayload

log = logging.getLogger(__name__)

PRODUCER_ID = "service:policy"


async def emit(conn: asyncpg.Connection, vault_id: uuid.UUID, payload: EventPayload) -> None:
    await outbox.emit(conn, payload, vault_id=vault_id, key=str(vault_id), producer_id=PRODUCER_ID)


def policy_event_model(row: dict[str, Any]) -> ev.Policy:
    return ev.Policy(
        policy_id=row["policy_id"],
        name=row["name"],
        settings=ev.ReplicationPolicySettings.model_validate(row["settings"]),
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def policy_view(row: dict[str, Any]) -> dict[str, Any]:
    """The API form of a policy row (settings normalised through the model)."""
    return {**policy_event_model(row).model_dump(mode="json"), "vault_id": str(row["vault_id"])}


# ------------------------------------------------------------------------------ policies


async def create_policy(
    pool: asyncpg.Pool, vault_id: uuid.UUID, name: str, settings: ev.ReplicationPolicySettings
) -> dict[str, Any]:
    domain.check_schedule(settings, datetime.now(UTC))
    async with pool.acquire() as conn, conn.transaction():
        try:
            row = await repo.insert_policy(
                conn, vault_id, uuid.uuid4(), name, settings.model_dump(mode="json")
            )
        except asyncpg.UniqueViolationError:
            raise domain.Conflict(
                f"a policy named '{name}' already exists in this vault: choose another name "
                "or update that policy"
            ) from None
        await emit(conn, vault_id, ev.PolicyCreated(policy=policy_event_model(row)))
    log.info(
        "policy created", extra={"vault_id": str(vault_id), "policy_id": str(row["policy_id"])}
    )
    return policy_view(row)


async def _policy_or_404(
    conn: asyncpg.Connection, vault_id: uuid.UUID, ref: str, *, lock: bool = False
) -> dict[str, Any]:
    row = await repo.get_policy(conn, vault_id, ref, lock=lock)
    if row is None:
        raise domain.NotFound(f"policy '{ref}' not found in this vault")
    return row


async def get_policy(pool: asyncpg.Pool, vault_id: uuid.UUID, ref: str) -> dict[str, Any]:
    async with pool.acquire() as conn:
        row = await _policy_or_404(conn, vault_id, ref)
        pairings = await repo.list_pairings(conn, vault_id, row["policy_id"])
    return {**policy_view(row), "pairing_ids": [str(p["pairing_id"]) for p in pairings]}


async def list_policies(pool: asyncpg.Pool, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        return [policy_view(r) for r in await repo.list_policies(conn, vault_id)]


async def update_policy(
    pool: asyncpg.Pool,
    vault_id: uuid.UUID,
    ref: str,
    *,
    name: str | None,
    changes: dict[str, Any],
) -> dict[str, Any]:
    """Apply `changes` to a policy's settings (and rename it); emits PolicyUpdated with the
    pairings using it, so their protected items re-apply the policy."""
    async with pool.acquire() as conn, conn.transaction():
        row = await _policy_or_404(conn, vault_id, ref, lock=True)
        current = ev.ReplicationPolicySettings.model_validate(row["settings"])
        settings = domain.updated_settings(current, changes)
        if "initial_replication" in changes or "initial_replication_start_at" in changes:
            domain.check_schedule(settings, datetime.now(UTC))
        try:
            async with conn.transaction():
                updated = await repo.update_policy(
                    conn, row["policy_id"], name or row["name"], settings.model_dump(mode="json")
                )
        except asyncpg.UniqueViolationError:
            raise domain.Conflict(
                f"a policy named '{name}' already exists in this vault: choose another name"
            ) from None
        pairings = await repo.list_pairings(conn, vault_id, row["policy_id"])
        pairing_ids = [p["pairing_id"] for p in pairings]
        await emit(
            conn,
            vault_id,
            ev.PolicyUpdated(policy=policy_event_model(updated), pairing_ids=pairing_ids),
        )
    log.info(
        "policy updated",
        extra={"policy_id": str(row["policy_id"]), "version": updated["version"]},
    )
    return {**policy_view(updated), "pairing_ids": [str(p) for p in pairing_ids]}


async def delete_policy(pool: asyncpg.Pool, vault_id: uuid.UUID, ref: str) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        await repo.lock_vault(conn, vault_id)
        row = await _policy_or_404(conn, vault_id, ref, lock=True)
        used_by = [repo.pairing_facts(p) for p in await repo.list_pairings(conn, vault_id)]
        domain.check_policy_deletable(
            row["name"], [p for p in used_by if p.policy_id == row["policy_id"]]
        )
        await repo.delete_policy(conn, row["policy_id"])
        await emit(conn, vault_id, ev.PolicyDeleted(policy=policy_event_model(row)))
    log.info("policy deleted", extra={"policy_id": str(row["policy_id"])})
    return policy_view(row)


# ------------------------------------------------------------------------------ pairings


def _pairing_event_model(row: dict[str, Any]) -> ev.CloudPairing:
    return ev.CloudPairing(
        pairing_id=row["pairing_id"],
        source_cloud_id=row["source_cloud_id"],
        source_site=row["source_site"],
        target_cloud_id=row["target_cloud_id"],
        target_site=row["target_site"],
        policy_id=row["policy_id"],
        created_at=row["created_at"],
    )


async def create_pairing(
    pool: asyncpg.Pool,
    vault_id: uuid.UUID,
    *,
    source_cloud_id: str,
    target_cloud_id: str,
    policy_ref: str,
) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        await repo.lock_vault(conn, vault_id)
        policy = await _policy_or_404(conn, vault_id, policy_ref)
        source = await reads.get_cloud(conn, vault_id, source_cloud_id)
        target = await reads.get_cloud(conn, vault_id, target_cloud_id)
        provider = (
            await reads.site_provider(conn, vault_id, target.provider_id, target.site)
            if target is not None
            else None
        )
        domain.check_pairing(
            source_cloud_id=source_cloud_id,
            target_cloud_id=target_cloud_id,
            source=source,
            target=target,
            target_provider=provider,
            host_os_versions=await reads.host_os_versions(
                conn, vault_id, [source_cloud_id, target_cloud_id]
            ),
            policy_name=policy["name"],
            policy=ev.ReplicationPolicySettings.model_validate(policy["settings"]),
            existing=[repo.pairing_facts(p) for p in await repo.list_pairings(conn, vault_id)],
        )
        assert source is not None and target is not None
        facts = domain.PairingFacts(
            pairing_id=uuid.uuid4(),
            source_cloud_id=source.cloud_id,
            source_site=source.site,
            target_cloud_id=target.cloud_id,
            target_site=target.site,
            policy_id=policy["policy_id"],
        )
        await repo.insert_pairing(conn, vault_id, facts)
        row = await repo.get_pairing(conn, vault_id, facts.pairing_id)
        assert row is not None
        await emit(conn, vault_id, ev.CloudPairingCreated(pairing=_pairing_event_model(row)))
        await publish_verdicts(
            conn, vault_id, await reads.vm_ids_in_cloud(conn, vault_id, source.cloud_id)
        )
    log.info(
        "clouds paired",
        extra={
            "pairing_id": str(facts.pairing_id),
            "source_cloud_id": source_cloud_id,
            "target_cloud_id": target_cloud_id,
        },
    )
    return row


async def list_pairings(pool: asyncpg.Pool, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        return await repo.list_pairings(conn, vault_id)


async def get_pairing(
    pool: asyncpg.Pool, vault_id: uuid.UUID, pairing_id: uuid.UUID
) -> dict[str, Any]:
    async with pool.acquire() as conn:
        row = await repo.get_pairing(conn, vault_id, pairing_id)
    if row is None:
        raise domain.NotFound(f"cloud pairing {pairing_id} not found in this vault")
    return row


async def remove_pairing(
    pool: asyncpg.Pool, vault_id: uuid.UUID, pairing_id: uuid.UUID
) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        await repo.lock_vault(conn, vault_id)
        row = await repo.get_pairing(conn, vault_id, pairing_id)
        if row is None:
            raise domain.NotFound(f"cloud pairing {pairing_id} not found in this vault")
        protected = await reads.protected_in_source(conn, vault_id, row["source_cloud_id"])
        domain.check_unpair(repo.pairing_facts(row), protected)
        await repo.delete_pairing(conn, pairing_id)
        await emit(conn, vault_id, ev.CloudPairingRemoved(pairing=_pairing_event_model(row)))
        await publish_verdicts(
            conn, vault_id, await reads.vm_ids_in_cloud(conn, vault_id, row["source_cloud_id"])
        )
    log.info("pairing removed", extra={"pairing_id": str(pairing_id)})
    return row


# ------------------------------------------------------------------------------ network mappings


def _mapping_event_model(row: dict[str, Any]) -> ev.NetworkMapping:
    return ev.NetworkMapping(
        mapping_id=row["mapping_id"],
        source_network_id=row["source_network_id"],
        source_site=row["source_site"],
        target_network_id=row["target_network_id"],
        target_site=row["target_site"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def _pairings(conn: asyncpg.Connection, vault_id: uuid.UUID) -> list[domain.PairingFacts]:
    return [repo.pairing_facts(p) for p in await repo.list_pairings(conn, vault_id)]


async def create_mapping(
    pool: asyncpg.Pool, vault_id: uuid.UUID, *, source_network_id: str, target_network_id: str
) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        await repo.lock_vault(conn, vault_id)
        source = await reads.get_network(conn, vault_id, source_network_id)
        target = await reads.get_network(conn, vault_id, target_network_id)
        domain.check_mapping(
            source_network_id=source_network_id,
            target_network_id=target_network_id,
            source=source,
            target=target,
            pairings=await _pairings(conn, vault_id),
            existing=await repo.mapping_of_source(conn, vault_id, source_network_id),
        )
        assert source is not None and target is not None
        mapping_id = uuid.uuid4()
        await repo.insert_mapping(conn, vault_id, mapping_id, source, target)
        row = await repo.get_mapping(conn, vault_id, mapping_id)
        assert row is not None
        await emit(conn, vault_id, ev.NetworkMappingCreated(mapping=_mapping_event_model(row)))
        await publish_verdicts(conn, vault_id)
    log.info("network mapped", extra={"mapping_id": str(mapping_id)})
    return row


async def list_mappings(pool: asyncpg.Pool, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        return await repo.list_mappings(conn, vault_id)


async def get_mapping(
    pool: asyncpg.Pool, vault_id: uuid.UUID, mapping_id: uuid.UUID
) -> dict[str, Any]:
    async with pool.acquire() as conn:
        row = await repo.get_mapping(conn, vault_id, mapping_id)
    if row is None:
        raise domain.NotFound(f"network mapping {mapping_id} not found in this vault")
    return row


async def change_mapping(
    pool: asyncpg.Pool, vault_id: uuid.UUID, mapping_id: uuid.UUID, target_network_id: str
) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        await repo.lock_vault(conn, vault_id)
        row = await repo.get_mapping(conn, vault_id, mapping_id)
        if row is None:
            raise domain.NotFound(f"network mapping {mapping_id} not found in this vault")
        source = await reads.get_network(conn, vault_id, row["source_network_id"])
        target = await reads.get_network(conn, vault_id, target_network_id)
        domain.check_mapping(
            source_network_id=row["source_network_id"],
            target_network_id=target_network_id,
            source=source,
            target=target,
            pairings=await _pairings(conn, vault_id),
            existing=None,
        )
        assert target is not None
        await repo.retarget_mapping(conn, mapping_id, target)
        updated = await repo.get_mapping(conn, vault_id, mapping_id)
        assert updated is not None
        await emit(
            conn,
            vault_id,
            ev.NetworkMappingChanged(
                mapping=_mapping_event_model(updated),
                previous_target_network_id=row["target_network_id"],
            ),
        )
        await publish_verdicts(conn, vault_id)
    log.info("network mapping changed", extra={"mapping_id": str(mapping_id)})
    return updated


async def remove_mapping(
    pool: asyncpg.Pool, vault_id: uuid.UUID, mapping_id: uuid.UUID
) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.get_mapping(conn, vault_id, mapping_id)
        if row is None:
            raise domain.NotFound(f"network mapping {mapping_id} not found in this vault")
        await repo.delete_mapping(conn, mapping_id)
        await emit(conn, vault_id, ev.NetworkMappingRemoved(mapping=_mapping_event_model(row)))
        await publish_verdicts(conn, vault_id)
    log.info("network mapping removed", extra={"mapping_id": str(mapping_id)})
    return row


# ------------------------------------------------------------------------------ prerequisites


async def check_prerequisites(
    conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str
) -> dict[str, Any]:
    """The enable-replication prerequisite report of one VM."""
    vm = await reads.get_vm(conn, vault_id, vm_id)
    pairing_row = await repo.pairing_of_source(conn, vault_id, vm.cloud_id) if vm else None
    pairing = repo.pairing_facts(pairing_row) if pairing_row else None
    target = await reads.get_cloud(conn, vault_id, pairing.target_cloud_id) if pairing else None
    network_ids = [n.network_id for n in vm.nics if n.network_id] if vm else []
    checks = domain.prerequisite_checks(
        vm_id,
        vm,
        pairing=pairing,
        mapped_networks=await repo.mapped_networks(conn, vault_id, network_ids),
        protected=await reads.is_protected(conn, vault_id, vm_id),
        target=target,
        protected_in_target=(
            await reads.protected_in_target(conn, vault_id, target.cloud_id) if target else 0
        ),
    )
    return {
        "vm_id": vm_id,
        "ok": domain.prerequisites_ok(checks),
        "checks": [
            {"rule": c.rule, "status": c.status.value, "message": c.message} for c in checks
        ],
    }


async def check_many(
    pool: asyncpg.Pool, vault_id: uuid.UUID, vm_ids: list[str]
) -> list[dict[str, Any]]:
    async with pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
        return [await check_prerequisites(conn, vault_id, vm_id) for vm_id in vm_ids]


async def publish_verdicts(
    conn: asyncpg.Connection, vault_id: uuid.UUID, vm_ids: list[str] | None = None
) -> int:
    """Re-evaluate the prerequisites of `vm_ids` (None: every VM of the vault) after a change
    they depend on, in the caller's transaction; each verdict that differs from the last one is
    recorded and emitted (`PrerequisitesEvaluated`). Returns how many were emitted.

    The vault lock orders this after any concurrent change of the vault's pairings and
    mappings: a verdict is computed from what is committed once the lock is held, so the last
    verdict emitted for a VM is never older than the facts behind it."""
    await repo.lock_vault(conn, vault_id)
    subjects = await reads.vm_ids(conn, vault_id) if vm_ids is None else sorted(set(vm_ids))
    emitted = 0
    for vm_id in subjects:
        report = await check_prerequisites(conn, vault_id, vm_id)
        revision = await reads.store_verdict(conn, vault_id, vm_id, report["ok"], report["checks"])
        if revision is None:
            continue
        await emit(
            conn,
            vault_id,
            ev.PrerequisitesEvaluated(
                vm_id=vm_id,
                ok=report["ok"],
                checks=[ev.PrerequisiteCheck.model_validate(c) for c in report["checks"]],
                revision=revision,
            ),
        )
        emitted += 1
    return emitted


async def publish_all_verdicts(pool: asyncpg.Pool) -> int:
    """At start-up: re-evaluate every VM of every vault (a verdict whose rules changed with a
    new version, or that was never published, goes out; the others are unchanged)."""
    async with pool.acquire() as conn:
        vaults = await reads.vaults_with_vms(conn)
    emitted = 0
    for vault_id in vaults:
        async with pool.acquire() as conn, conn.transaction():
            emitted += await publish_verdicts(conn, vault_id)
    if emitted:
        log.info("prerequisite verdicts published at start-up", extra={"count": emitted})
    return emitted


# ------------------------------------------------------------------------------ read models


async def on_cloud_changed(conn: asyncpg.Connection, incoming: Incoming) -> None:
    ev_ = incoming.payload
    assert isinstance(ev_, inv.CloudChanged)
    vault = incoming.envelope.vault_id
    if ev_.change is inv.Change.REMOVED or ev_.cloud is None:
        await reads.remove_inventory_object(conn, vault, "cloud", ev_.cloud_id)
    else:
        await reads.upsert_cloud(conn, vault, ev_.provider_id, ev_.site, ev_.cloud)
    await publish_verdicts(conn, vault)


async def on_host_changed(conn: asyncpg.Connection, incoming: Incoming) -> None:
    ev_ = incoming.payload
    assert isinstance(ev_, inv.HostChanged)
    vault = incoming.envelope.vault_id
    if ev_.change is inv.Change.REMOVED or ev_.host is None:
        await reads.remove_inventory_object(conn, vault, "host", ev_.host_id)
    else:
        await reads.upsert_host(conn, vault, ev_.provider_id, ev_.site, ev_.host)


async def on_vm_changed(conn: asyncpg.Connection, incoming: Incoming) -> None:
    ev_ = incoming.payload
    assert isinstance(ev_, inv.VmChanged)
    vault = incoming.envelope.vault_id
    if ev_.change is inv.Change.REMOVED or ev_.vm is None:
        await reads.remove_inventory_object(conn, vault, "vm", ev_.vm_id)
    else:
        await reads.upsert_vm(conn, vault, ev_.provider_id, ev_.site, ev_.vm)
    await publish_verdicts(conn, vault, [ev_.vm_id])


async def on_network_changed(conn: asyncpg.Connection, incoming: Incoming) -> None:
    ev_ = incoming.payload
    assert isinstance(ev_, inv.NetworkChanged)
    vault = incoming.envelope.vault_id
    if ev_.change is inv.Change.REMOVED or ev_.network is None:
        await reads.remove_inventory_object(conn, vault, "network", ev_.network_id)
    else:
        await reads.upsert_network(conn, vault, ev_.provider_id, ev_.site, ev_.network)


def inventory_handlers() -> dict[str, Handler]:
    return {
        "CloudChanged": on_cloud_changed,
        "HostChanged": on_host_changed,
        "VmChanged": on_vm_changed,
        "NetworkChanged": on_network_changed,
    }

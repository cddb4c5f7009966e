"""The operator's commands on protection: enable (create the protected item and command the
source agent), pause, resume, resync, disable; each loads the protected item through the unit
of work, calls its method (services/replication/item.py: the rule, the state, the agent command
and the events) and commits, in one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import asyncpg

from services.replication import domain, leaves
from services.replication import read_model_repository as rm_repo
from services.replication import repository as repo
from services.replication.context import Context, emit
from services.replication.health import RPO_SECONDS, RPO_THRESHOLD
from services.replication.item import ProtectedItem
from services.replication.resync import require_resync
from services.replication.unit_of_work import ItemUnitOfWork
from shared.readmodels import NotYetKnown
from shared.schemas import replication as ev
from shared.schemas.replication import ItemState


def _vm_disks(vm: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"disk_id": d["disk_id"], "path": d.get("path", ""), "size_bytes": d["size_bytes"]}
        for d in vm.get("disks", [])
    ]


async def enable_protection(ctx: Context, vault_id: uuid.UUID, vm_id: str) -> dict[str, Any]:
    """Create the protected item and command the source agent, if the policy service's
    prerequisite verdict for the VM allows it."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        existing = await repo.active_item_for_vm(conn, vault_id, vm_id)
        if existing is not None:
            raise domain.ReplicationError(
                f"VM {vm_id} is already protected (item {existing['item_id']})"
            )
        try:
            domain.check_prerequisites(vm_id, await rm_repo.prerequisites_of(conn, vault_id, vm_id))
        except domain.VerdictPending as exc:
            raise NotYetKnown(exc.message) from None
        context = await rm_repo.protection_context(conn, vault_id, vm_id)
        if context is None:
            raise NotYetKnown(
                f"VM {vm_id} is not known in a paired cloud of this vault with a policy "
                "(check inventory, the cloud pairing and its policy)"
            )
        agent = await rm_repo.agent_named(conn, vault_id, context["host_name"])
        if agent is None:
            raise NotYetKnown(
                f"no host agent registered for host '{context['host_name']}': install and "
                "register the agent on the VM's host first"
            )
        settings = context["settings"]
        vm = context["vm"]
        disks = _vm_disks(vm)
        if not disks:
            raise domain.ReplicationError(f"VM {vm_id} has no disks to replicate")
        too_large = [d for d in disks if d["size_bytes"] > ctx.settings.max_disk_bytes]
        if too_large:
            raise domain.ReplicationError(
                f"VM {vm_id}: disk {too_large[0]['disk_id']} has {too_large[0]['size_bytes']} "
                f"bytes, more than the {ctx.settings.max_disk_bytes} this service protects"
            )
        item_id = uuid.uuid4()
        item = await repo.insert_item(
            conn,
            item_id=item_id,
            vault_id=vault_id,
            vm_id=vm_id,
            vm_name=context["vm_name"],
            pairing_id=context["pairing_id"],
            policy_id=context["policy_id"],
            source_agent_id=agent["producer_id"],
            source_site=context["site"],
            target_site=context["target_site"],
            target_cloud_id=context["target_cloud_id"],
            disks=disks,
            copy_interval_seconds=int(settings["copy_frequency_seconds"]),
            state=ItemState.WAITING_FOR_INITIAL.value,
            recovery_agent_id=await rm_repo.recovery_agent(conn, vault_id, context["target_site"]),
        )
        await emit(
            conn,
            vault_id,
            ev.ProtectionEnabled(
                item_id=item_id,
                vm_id=vm_id,
                vm_name=context["vm_name"],
                source_cloud_id=vm["cloud_id"],
                target_cloud_id=context["target_cloud_id"],
                pairing_id=context["pairing_id"],
                policy_id=context["policy_id"],
                source_agent_id=agent["producer_id"],
            ),
            str(item_id),
        )
        await request_enable(conn, item_id, settings)
    return item


async def request_enable(
    conn: asyncpg.Connection, item_id: uuid.UUID, settings: dict[str, Any]
) -> None:
    """Command a new item's source agent to replicate it, per its policy's `settings`."""
    async with ItemUnitOfWork(conn) as uow:
        item = await uow.load(item_id)
        assert item is not None
        item.request_enable(settings)
        await uow.commit()


async def _load_for_action(
    uow: ItemUnitOfWork, vault_id: uuid.UUID, item_id: uuid.UUID
) -> ProtectedItem:
    item = await uow.load(item_id)
    if item is None or not item.active or item.vault_id != vault_id:
        raise domain.ReplicationError(f"protected item {item_id} not found")
    return item


async def pause(ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction(), ItemUnitOfWork(conn) as uow:
        item = await _load_for_action(uow, vault_id, item_id)
        item.pause()
        await uow.commit()
    return item.as_row()


async def resume(ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction(), ItemUnitOfWork(conn) as uow:
        item = await _load_for_action(uow, vault_id, item_id)
        item.resume()
        await uow.commit()
    return item.as_row()


async def resync(ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction(), ItemUnitOfWork(conn) as uow:
        item = await _load_for_action(uow, vault_id, item_id)
        item.check_resync_allowed()
        await require_resync(ctx, conn, item, "manual resync requested")
        await uow.commit()
    return item.as_row()


async def disable(
    ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID, delete_replica: bool | None
) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction(), ItemUnitOfWork(conn) as uow:
        item = await _load_for_action(uow, vault_id, item_id)
        settings = await rm_repo.policy_settings(conn, item.vault_id, item.policy_id)
        delete = (
            delete_replica
            if delete_replica is not None
            else bool(settings.get("delete_replica_on_disable", False))
        )
        await repo.drop_cycles(conn, item_id)
        item.disable(delete_replica=delete)
        if delete:
            await leaves.forget(conn, item_id)
        await uow.commit()
    if delete:
        await asyncio.to_thread(ctx.store(item.target_site).delete_item, str(item_id))
    with contextlib.suppress(KeyError):  # no RPO series yet
        RPO_SECONDS.remove(str(item_id), item.vm_name)
    with contextlib.suppress(KeyError):
        RPO_THRESHOLD.remove(str(item_id), item.vm_name)
    return item.as_row()

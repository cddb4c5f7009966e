"""The operator's commands on protection: enable (create the protected item and command the
source agent), pause, resume, resync, disable; each loads the item, checks the rule in
domain.py and writes the state, the agent command and the events in one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import asyncpg

from services.replication import domain
from services.replication import read_model_repository as rm_repo
from services.replication import repository as repo
from services.replication.context import Context, change_state, command, emit
from services.replication.health import RPO_SECONDS, RPO_THRESHOLD
from services.replication.resync import require_resync
from shared.kafka.decode import Incoming, Rejected
from shared.readmodels import NotYetKnown
from shared.schemas import agent as cmd
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
        await command(conn, item, enable_command(item, settings))
    return item


def check_enable_answer(item: dict[str, Any], inc: Incoming) -> None:
    """An enable failure counts only from the item's source agent, in its vault, for the
    enable command the item is waiting on."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    if item["vault_id"] != inc.envelope.vault_id:
        raise Rejected("vault_mismatch", "the item belongs to another vault")
    if str(item["source_agent_id"]) != inc.envelope.producer_id:
        raise Rejected(
            "wrong_answerer",
            f"the enable command was sent to {item['source_agent_id']}, "
            f"not {inc.envelope.producer_id}",
        )
    if msg.command_id != enable_command_id(item):
        raise Rejected("wrong_answerer", f"{msg.command_id} is not the item's enable command")


def enable_command_id(item: dict[str, Any]) -> uuid.UUID:
    return uuid.uuid5(item["item_id"], f"enable:{item['last_committed_seq'] or 0}")


def enable_command(
    item: dict[str, Any], settings: dict[str, Any]
) -> cmd.ReplicationEnableRequested:
    initial = settings.get("initial_replication", "online_now")
    return cmd.ReplicationEnableRequested(
        command_id=enable_command_id(item),
        agent_id=item["source_agent_id"],
        item_id=item["item_id"],
        vm_id=item["vm_id"],
        vm_name=item["vm_name"],
        disks=[cmd.DiskSpec(**d) for d in item["disks"]],
        copy_interval_seconds=int(settings["copy_frequency_seconds"]),
        compression=ev.Compression.ZLIB if settings.get("compression") else ev.Compression.NONE,
        app_consistent_interval_seconds=int(settings.get("app_consistent_frequency_hours", 0))
        * 3600,
        initial_replication=cmd.InitialReplication(initial),
        scheduled_at=settings.get("initial_replication_start_at"),
        export_path=settings.get("offline_export_path"),
        next_cycle_seq=(item["last_committed_seq"] or 0) + 1,
    )


async def _load_for_action(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID
) -> dict[str, Any]:
    item = await repo.get_item(conn, item_id, lock=True)
    if item is None or not item["active"] or item["vault_id"] != vault_id:
        raise domain.ReplicationError(f"protected item {item_id} not found")
    return item


async def pause(ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        item = await _load_for_action(conn, vault_id, item_id)
        domain.check_action(ItemState(item["state"]), "pause")
        await command(
            conn,
            item,
            cmd.ReplicationPauseRequested(
                command_id=uuid.uuid4(), agent_id=item["source_agent_id"], item_id=item_id
            ),
        )
        await change_state(
            conn, item, ItemState.SUSPENDED, reason="paused by operator", paused=True
        )
    return item


async def resume(ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        item = await _load_for_action(conn, vault_id, item_id)
        domain.check_action(ItemState(item["state"]), "resume")
        await command(
            conn,
            item,
            cmd.ReplicationResumeRequested(
                command_id=uuid.uuid4(), agent_id=item["source_agent_id"], item_id=item_id
            ),
        )
        state = (
            ItemState.REPLICATING
            if item["last_committed_seq"] is not None
            else ItemState.WAITING_FOR_INITIAL
        )
        await change_state(conn, item, state, reason="resumed by operator", paused=False)
    return item


async def resync(ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        item = await _load_for_action(conn, vault_id, item_id)
        domain.check_action(ItemState(item["state"]), "resync")
        await require_resync(ctx, conn, item, "manual resync requested")
    return item


async def disable(
    ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID, delete_replica: bool | None
) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        item = await _load_for_action(conn, vault_id, item_id)
        settings = await rm_repo.policy_settings(conn, item["vault_id"], item["policy_id"])
        delete = (
            delete_replica
            if delete_replica is not None
            else bool(settings.get("delete_replica_on_disable", False))
        )
        await command(
            conn,
            item,
            cmd.ReplicationDisableRequested(
                command_id=uuid.uuid4(), agent_id=item["source_agent_id"], item_id=item_id
            ),
        )
        await repo.drop_cycles(conn, item_id)
        if delete:
            await drop_site_replica(conn, item)
        await change_state(
            conn, item, ItemState.NOT_ENABLED, reason="protection disabled", active=False
        )
        await emit(
            conn,
            vault_id,
            ev.ProtectionDisabled(item_id=item_id, vm_id=item["vm_id"], replica_deleted=delete),
            str(item_id),
        )
    if delete:
        await asyncio.to_thread(ctx.store(item["target_site"]).delete_item, str(item_id))
    with contextlib.suppress(KeyError):  # no RPO series yet
        RPO_SECONDS.remove(str(item_id), item["vm_name"])
    with contextlib.suppress(KeyError):
        RPO_THRESHOLD.remove(str(item_id), item["vm_name"])
    return item


async def drop_site_replica(conn: asyncpg.Connection, item: dict[str, Any]) -> None:
    """Command the item's recovery host to delete its replica (idempotent)."""
    if item["recovery_agent_id"] is None:
        return
    await emit(
        conn,
        item["vault_id"],
        cmd.ReplicaDeleteRequested(
            command_id=uuid.uuid5(item["item_id"], "replica-delete"),
            agent_id=item["recovery_agent_id"],
            item_id=item["item_id"],
        ),
        str(item["recovery_agent_id"]),
    )

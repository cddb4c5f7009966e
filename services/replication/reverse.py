"""Reverse replication (`ReverseReplicationRequested`): the failed-over item deactivated and a
new one protecting the recovery VM towards the old primary site; with seed disks its replica
is seeded from the old primary's images (by the failover worker, outside any transaction),
then the new source agent is enabled `seeded` and asked for a resync: only the blocks that
differ travel. A refused request is answered with an `ItemStateChanged` (state error)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from services.replication import read_model_repository as rm_repo
from services.replication import repository as repo
from services.replication import request_repository as request_repo
from services.replication.context import Context, emit
from services.replication.handlers import request_enable
from services.replication.resync import request_resync
from services.replication.store import StoreError
from services.replication.unit_of_work import ItemUnitOfWork
from shared.files import OutsideRoots, confined
from shared.kafka.decode import Incoming
from shared.schemas import agent as cmd
from shared.schemas import failover as fo
from shared.schemas import replication as ev
from shared.schemas.replication import Health, ItemState

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request that can't be carried out; the message is the answer's error."""


async def plan_reverse(
    conn: asyncpg.Connection,
    inc: Incoming,
    msg: fo.ReverseReplicationRequested,
    old: dict[str, Any] | None,
    roots: list[Path] | None,
) -> dict[str, Any]:
    """Check the request; the settings and clouds of the new item. `Refused` says why not.
    Seed disks must lie under the materialise roots (after links); `roots` None: they are the
    recovery host's files, which its agent checks when it seeds."""
    if old is None or not old["active"]:
        raise Refused(f"protected item {msg.old_item_id} not found (or no longer active)")
    if ItemState(old["state"]) is not ItemState.FAILED_OVER:
        raise Refused(
            f"item {msg.old_item_id} is in state '{old['state']}': reverse replication "
            "needs a failed-over item"
        )
    disk_ids = [d.disk_id for d in msg.disks]
    if len(set(disk_ids)) != len(disk_ids):
        raise Refused(f"disk ids repeat: {disk_ids}")
    if msg.seed_disks:
        seeds = {s.disk_id: s.path for s in msg.seed_disks}
        if set(seeds) != set(disk_ids) or len(seeds) != len(msg.seed_disks):
            raise Refused(
                f"seed_disks must name each disk once: disks {sorted(disk_ids)}, "
                f"seeds {sorted(s.disk_id for s in msg.seed_disks)}"
            )
        for disk_id, path in seeds.items():
            if roots is None:
                continue  # the recovery host's files: its agent checks them
            try:
                real = confined(path, roots)
            except OutsideRoots as exc:
                raise Refused(f"seed disk {disk_id}: {exc}") from None
            if not await asyncio.to_thread(real.is_file):
                raise Refused(f"seed disk {disk_id}: no image file at {path}")
    elif not msg.force_full_resync:
        raise Refused(
            "no seed disks: set force_full_resync to copy every block, or give the old "
            "primary's disks as seed_disks"
        )
    agent = await rm_repo.agent_by_id(conn, msg.source_agent_id)
    if agent is None or not agent["active"] or agent["vault_id"] != inc.envelope.vault_id:
        raise Refused(f"no active host agent {msg.source_agent_id} in this vault")
    clash = await repo.active_item_for_vm(conn, old["vault_id"], msg.vm_id)
    if clash is not None and clash["item_id"] != old["item_id"]:
        raise Refused(f"VM {msg.vm_id} is already protected (item {clash['item_id']})")
    settings = await rm_repo.policy_settings(conn, old["vault_id"], old["policy_id"])
    old_source_cloud = await rm_repo.pairing_source_cloud(
        conn, old["vault_id"], old["pairing_id"]
    ) or await rm_repo.vm_cloud(conn, old["vault_id"], old["vm_id"])
    return {
        "settings": settings,
        "source_cloud_id": old["target_cloud_id"],
        "target_cloud_id": old_source_cloud or "",
    }


async def refuse_reverse(
    conn: asyncpg.Connection, inc: Incoming, msg: fo.ReverseReplicationRequested, why: str
) -> None:
    reason = f"reverse replication refused: {why}"
    log.warning(reason, extra={"request_id": str(msg.request_id), "item": str(msg.new_item_id)})
    answer = ev.ItemStateChanged(
        item_id=msg.new_item_id,
        vm_id=msg.vm_id,
        state=ItemState.ERROR,
        previous_state=None,
        health=Health.CRITICAL,
        reason=reason,
    )
    await request_repo.insert_request(
        conn,
        request_id=msg.request_id,
        kind="reverse",
        vault_id=inc.envelope.vault_id,
        item_id=msg.new_item_id,
        request=msg.model_dump(mode="json"),
        state="failed",
        answer_type="ItemStateChanged",
        answer=answer.model_dump(mode="json"),
    )
    await emit(conn, inc.envelope.vault_id, answer, str(msg.new_item_id))


async def start_reverse(
    ctx: Context,
    conn: asyncpg.Connection,
    inc: Incoming,
    msg: fo.ReverseReplicationRequested,
    old: dict[str, Any],
    plan: dict[str, Any],
) -> None:
    vault_id = inc.envelope.vault_id
    await repo.drop_cycles(conn, old["item_id"])
    async with ItemUnitOfWork(conn) as uow:  # committed first: one active item per VM
        retired = await uow.load(old["item_id"])
        assert retired is not None
        retired.end_protection(f"reverse replication: now protected as item {msg.new_item_id}")
        await uow.commit()
    seeded = bool(msg.seed_disks)
    settings = plan["settings"]
    item = await repo.insert_item(
        conn,
        item_id=msg.new_item_id,
        vault_id=vault_id,
        vm_id=msg.vm_id,
        vm_name=msg.vm_name,
        pairing_id=old["pairing_id"],
        policy_id=old["policy_id"],
        source_agent_id=msg.source_agent_id,
        source_site=msg.source_site,
        target_site=msg.target_site,
        target_cloud_id=plan["target_cloud_id"],
        disks=[d.model_dump(mode="json") for d in msg.disks],
        copy_interval_seconds=int(
            settings.get("copy_frequency_seconds", old["copy_interval_seconds"])
        ),
        state=(
            ItemState.WAITING_TO_START_RESYNC if seeded else ItemState.WAITING_FOR_INITIAL
        ).value,
        health=(Health.CRITICAL if seeded else Health.NORMAL).value,
        error="reverse replication: seeding the replica from the old primary's disks"
        if seeded
        else None,
        # without a block copy here, the old primary's host (where the VM ran, and its disks
        # are) keeps the new item's replica, seeded from those disks
        recovery_agent_id=None if ctx.settings.keep_block_copy else old["source_agent_id"],
    )
    await emit(
        conn,
        vault_id,
        ev.ProtectionEnabled(
            item_id=msg.new_item_id,
            vm_id=msg.vm_id,
            vm_name=msg.vm_name,
            source_cloud_id=plan["source_cloud_id"],
            target_cloud_id=plan["target_cloud_id"],
            pairing_id=old["pairing_id"],
            policy_id=old["policy_id"],
            source_agent_id=msg.source_agent_id,
        ),
        str(msg.new_item_id),
    )
    # The state the item is created in, for every view of it: a seeded item waits for its
    # resync against the seed (not ready for failover or failback until that resync commits).
    await emit(
        conn,
        vault_id,
        ev.ItemStateChanged(
            item_id=msg.new_item_id,
            vm_id=msg.vm_id,
            state=ItemState(item["state"]),
            previous_state=None,
            health=Health(item["health"]),
            reason=item["error"] or "reverse replication: initial replication",
        ),
        str(msg.new_item_id),
    )
    await request_repo.insert_request(
        conn,
        request_id=msg.request_id,
        kind="reverse",
        vault_id=vault_id,
        item_id=msg.new_item_id,
        request=msg.model_dump(mode="json"),
        state="pending" if seeded else "answered",
    )
    if seeded:
        ctx.failover_wake.set()  # the worker seeds the replica, then enables and resyncs
    else:
        full = {**settings, "initial_replication": cmd.InitialReplication.ONLINE_NOW.value}
        full.setdefault("copy_frequency_seconds", item["copy_interval_seconds"])
        await request_enable(conn, msg.new_item_id, full)
    log.info(
        "reverse replication started",
        extra={
            "old_item": str(old["item_id"]),
            "new_item": str(msg.new_item_id),
            "seeded": seeded,
        },
    )


async def seed_and_resync(ctx: Context, request: dict[str, Any]) -> None:
    """Seed the new item's replica from the old primary's images (point 1), then enable the
    new source agent `seeded` and ask it for a resync against those hashes. If seeding fails,
    fall back to a full resync (the item says why). An item whose replica its recovery host
    keeps (no block copy here) is seeded by that host, from its own disks
    (services/replication/seeding.py)."""
    msg = fo.ReverseReplicationRequested.model_validate(request["request"])
    async with ctx.pool.acquire() as conn:
        row = await repo.get_item(conn, msg.new_item_id)
    if row is not None and not ctx.keeps_blocks(row["recovery_agent_id"]):
        from services.replication.seeding import ask_host_to_seed

        await ask_host_to_seed(ctx, request, row)
        return
    item_key = str(msg.new_item_id)
    store = ctx.store(msg.target_site)
    seed = None
    failure = None
    try:
        roots = ctx.settings.allowed_roots()  # checked again: a link may have changed since
        images = {s.disk_id: confined(s.path, roots) for s in msg.seed_disks}
        manifest = await asyncio.to_thread(
            store.seed_from_images, item_key, 1, images, request["created_at"]
        )
        new_bytes = next((p.new_bytes for p in await asyncio.to_thread(store.points, item_key)), 0)
        seed = Seed(
            disks=[
                {"disk_id": d.disk_id, "size_bytes": d.size_bytes, "merkle_root": d.merkle_root}
                for d in manifest.disks
            ],
            changed_blocks=sum(len(d.changed) for d in manifest.disks),
            new_bytes=new_bytes,
        )
    except (OSError, StoreError, ValueError) as exc:
        failure = f"seeding from the old primary's disks failed ({exc}); copying every block"
        log.warning(failure, extra={"item_id": item_key})
    async with ctx.pool.acquire() as conn, conn.transaction():
        await finish_seeding(ctx, conn, request, seed, failure)


@dataclass(frozen=True)
class Seed:
    """A seeded point 1: its disks (id, size, root), blocks and bytes."""

    disks: list[dict[str, Any]]
    changed_blocks: int
    new_bytes: int


async def finish_seeding(
    ctx: Context,
    conn: asyncpg.Connection,
    request: dict[str, Any],
    seed: Seed | None,
    failure: str | None,
    *,
    replica_holds_it: bool = False,
) -> None:
    """In the caller's transaction: the reverse request answered, point 1 recorded from `seed`
    (or the item says why seeding failed: `failure`), the new source agent enabled `seeded`
    and asked for a resync (against the seed's hashes, or every block). `replica_holds_it`:
    the recovery host seeded its replica, which holds point 1."""
    msg = fo.ReverseReplicationRequested.model_validate(request["request"])
    item_key = str(msg.new_item_id)
    source_time: datetime = request["created_at"]
    item = await repo.get_item(conn, msg.new_item_id, lock=True)
    if item is None or not item["active"]:
        await request_repo.answer_request(conn, msg.request_id, "failed", None, None)
        return
    if not await request_repo.answer_request(conn, msg.request_id, "answered", None, None):
        return  # done by an earlier attempt
    settings = await rm_repo.policy_settings(conn, item["vault_id"], item["policy_id"])
    settings = {
        **settings,
        "initial_replication": cmd.InitialReplication.SEEDED.value,
        "copy_frequency_seconds": settings.get(
            "copy_frequency_seconds", item["copy_interval_seconds"]
        ),
    }
    if seed is not None:
        disks, changed, new_bytes = seed.disks, seed.changed_blocks, seed.new_bytes
        await repo.insert_point(
            conn,
            item_id=msg.new_item_id,
            cycle_seq=1,
            kind=ev.CycleKind.INITIAL.value,
            point_type=ev.RecoveryPointType.CRASH_CONSISTENT.value,
            source_time=source_time,
            disks=disks,
            changed_blocks=changed,
            bytes=new_bytes,
        )
        await repo.update_item(
            conn,
            msg.new_item_id,
            last_committed_seq=1,
            last_point_source_time=source_time,
            error="reverse replication: resync against the seeded replica",
        )
        item.update(
            last_committed_seq=1,
            last_point_source_time=source_time,
            error="reverse replication: resync against the seeded replica",
        )
        await emit(
            conn,
            item["vault_id"],
            ev.RecoveryPointCreated(
                item_id=msg.new_item_id,
                vm_id=item["vm_id"],
                cycle_seq=1,
                kind=ev.CycleKind.INITIAL,
                point_type=ev.RecoveryPointType.CRASH_CONSISTENT,
                source_time=source_time,
                disks=[ev.DiskRoot(**d) for d in disks],
                changed_blocks=changed,
                bytes_stored=new_bytes,
            ),
            item_key,
        )
        if replica_holds_it:
            await repo.update_item(conn, msg.new_item_id, replica_seq=1)
    else:
        await repo.update_item(conn, msg.new_item_id, error=failure)
        item["error"] = failure
    async with ItemUnitOfWork(conn) as uow:
        new = await uow.load(msg.new_item_id)
        assert new is not None
        new.request_enable(settings)
        await request_resync(ctx, conn, new)
        await uow.commit()

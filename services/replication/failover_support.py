"""The replication side of failover: the failover service's requests (`failover.events.v1`,
shared/schemas/failover.py) and what each does here.

- `RecoveryPointMaterialiseRequested`: recorded (one row per request id); a worker resolves
  the point, writes every disk into `target_dir/<disk_id>.vhdx` from the replica store
  (verified block by block, outside any transaction) and answers `RecoveryPointMaterialised`
  or `RecoveryPointMaterialiseFailed`: the answer is recorded and enqueued in the outbox in one
  transaction, so it is given exactly once; a repeated request id re-publishes it. A failover's
  request (`handover`) goes to the recovery host that keeps the item's replica instead
  (`ReplicaHandoverRequested`, the row 'delegated'), and so does a test failover's
  (`differencing`: `DifferencingDisksRequested`, differencing disks over a frozen view of the
  point): its answer is turned into the `RecoveryPointMaterialised` (no copy); if it cannot,
  or no host keeps a replica of the item, the row is pending again and copied here.
- `ItemFailedOver`: the item stops taking cycles (state failed_over) and the source agent is
  told to stop replicating.
- `ItemFailoverCommitted`: every recovery point but the one failed over to is deleted.
- `ReverseReplicationRequested`: the old item is deactivated and a new one protects the
  recovery VM towards the old primary site. With seed disks the new replica is seeded from the
  old primary's images (worker, outside any transaction), then the new source agent is enabled
  `seeded` and asked for a resync: only the blocks that differ travel. A refused request is
  answered with an `ItemStateChanged` (state error) for the new item id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from services.replication import domain
from services.replication import repository as repo
from services.replication.config import ReplicationSettings
from services.replication.handlers import (
    Context,
    change_state,
    command,
    drop_site_replica,
    emit,
    enable_command,
    request_resync,
)
from services.replication.store import StoreError
from shared.files import OutsideRoots, confined
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming, Rejected
from shared.schemas import agent as cmd
from shared.schemas import failover as fo
from shared.schemas import replication as ev
from shared.schemas.envelope import EventPayload
from shared.schemas.replication import Health, ItemState

log = logging.getLogger(__name__)

REQUESTER = "service:failover"
SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_ATTEMPTS = 5
BATCH = 4  # requests worked on at once


class _Refused(Exception):
    """A request that can't be carried out; the message is the answer's error."""


def materialise_target(settings: ReplicationSettings, target_dir: str, disk_ids: list[str]) -> Path:
    """The folder a point's disks are written to, `target_dir` resolved: it must lie under a
    materialise root (after links), hold no VM (vm.json) and every disk id must be usable as a
    file name. ValueError says what is wrong."""
    try:
        target = confined(target_dir, settings.allowed_roots())
    except OutsideRoots as exc:
        raise ValueError(f"target_dir is not under a materialise root: {exc}") from None
    if (target / "vm.json").exists():
        raise ValueError(f"target_dir {target} holds a VM (vm.json): its disks are not overwritten")
    bad = [d for d in disk_ids if not SAFE_FILE.fullmatch(d)]
    if bad:
        raise ValueError(f"disk ids unusable as file names: {bad}")
    return target


def _check_requester(inc: Incoming) -> None:
    if inc.envelope.producer_id != REQUESTER:
        raise Rejected(
            "not_failover_service",
            f"{inc.envelope.type} is accepted only from {REQUESTER}, "
            f"not {inc.envelope.producer_id}",
        )


def _same_vault(inc: Incoming, item: dict[str, Any]) -> None:
    if item["vault_id"] != inc.envelope.vault_id:
        raise Rejected("vault_mismatch", "the item belongs to another vault")


async def _answer_again(conn: asyncpg.Connection, request: dict[str, Any]) -> None:
    """A repeated request id: publish the recorded answer again (nothing else)."""
    log.info(
        "repeated failover request: answer sent again",
        extra={"request_id": str(request["request_id"]), "state": request["state"]},
    )
    if request["answer_type"] is None or request["answer"] is None:
        return
    answers: dict[str, type[EventPayload]] = {
        "RecoveryPointMaterialised": fo.RecoveryPointMaterialised,
        "RecoveryPointMaterialiseFailed": fo.RecoveryPointMaterialiseFailed,
        "ItemStateChanged": ev.ItemStateChanged,
    }
    payload = answers[request["answer_type"]].model_validate(request["answer"])
    await emit(conn, request["vault_id"], payload, str(request["item_id"]))


def make_failover_handlers(ctx: Context) -> dict[str, Handler]:
    async def on_materialise(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, fo.RecoveryPointMaterialiseRequested)
        _check_requester(inc)
        known = await repo.get_request(conn, msg.request_id)
        if known is not None:
            await _answer_again(conn, known)
            return
        item = await repo.get_item(conn, msg.item_id)
        if item is not None:
            _same_vault(inc, item)
        await repo.insert_request(
            conn,
            request_id=msg.request_id,
            kind="materialise",
            vault_id=inc.envelope.vault_id,
            item_id=msg.item_id,
            request=msg.model_dump(mode="json"),
        )
        ctx.failover_wake.set()

    async def on_failed_over(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, fo.ItemFailedOver)
        _check_requester(inc)
        item = await repo.get_item(conn, msg.item_id, lock=True)
        if item is None or not item["active"]:
            log.warning("failover of an unknown item ignored", extra={"item_id": str(msg.item_id)})
            return
        _same_vault(inc, item)
        state = ItemState(item["state"])
        if state is ItemState.FAILED_OVER:
            log.info("item already failed over", extra={"item_id": str(msg.item_id)})
            return
        refusal = domain.failover_refusal(state, item["last_committed_seq"] is not None)
        if refusal is not None:
            log.warning(
                "failover refused",
                extra={"item_id": str(msg.item_id), "reason": f"cannot fail over: {refusal}"},
            )
            return
        await repo.drop_cycles(conn, msg.item_id)
        await command(
            conn,
            item,
            cmd.ReplicationDisableRequested(
                command_id=uuid.uuid5(msg.item_id, "failover:disable"),
                agent_id=item["source_agent_id"],
                item_id=msg.item_id,
            ),
        )
        await change_state(
            conn,
            item,
            ItemState.FAILED_OVER,
            reason=f"{msg.kind.value} failover to recovery point {msg.cycle_seq}: VM "
            f"{msg.recovery_vm_name} runs at the recovery site",
            health=Health.NORMAL,
            error=None,
            health_reasons=[],
            resync_seq=None,
            resync_id=None,
            resync_not_before=None,
        )

    async def on_committed(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, fo.ItemFailoverCommitted)
        _check_requester(inc)
        item = await repo.get_item(conn, msg.item_id, lock=True)
        if item is None:
            log.warning("commit of an unknown item ignored", extra={"item_id": str(msg.item_id)})
            return
        _same_vault(inc, item)
        if ItemState(item["state"]) is not ItemState.FAILED_OVER:
            log.warning(
                "commit refused: the item is not failed over",
                extra={"item_id": str(msg.item_id), "state": item["state"]},
            )
            return
        live = {p["cycle_seq"]: p for p in await repo.live_points(conn, msg.item_id)}
        if msg.cycle_seq not in live:
            log.warning(
                "commit refused: the recovery point is not retained",
                extra={"item_id": str(msg.item_id), "cycle_seq": msg.cycle_seq},
            )
            return
        await drop_site_replica(conn, item)  # the VM runs on its own disks now
        drop = sorted(s for s in live if s != msg.cycle_seq)
        if not drop:
            return  # committed already
        store = ctx.store(item["target_site"])
        await asyncio.to_thread(
            store.prune, str(msg.item_id), {msg.cycle_seq}, truncate=True
        )  # crash-safe and idempotent: a retry after a failed transaction finds nothing to do
        await repo.mark_pruned(conn, msg.item_id, drop)
        await repo.update_item(
            conn,
            msg.item_id,
            last_committed_seq=msg.cycle_seq,
            last_point_source_time=live[msg.cycle_seq]["source_time"],
        )
        await emit(
            conn,
            item["vault_id"],
            ev.RecoveryPointsPruned(item_id=msg.item_id, cycle_seqs=drop),
            str(msg.item_id),
        )
        log.info(
            "failover committed",
            extra={"item_id": str(msg.item_id), "kept": msg.cycle_seq, "pruned": drop},
        )

    async def on_reverse(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, fo.ReverseReplicationRequested)
        _check_requester(inc)
        known = await repo.get_request(conn, msg.request_id)
        if known is not None:
            await _answer_again(conn, known)
            return
        if await repo.get_item(conn, msg.new_item_id) is not None:
            log.info("reverse item exists already", extra={"item": str(msg.new_item_id)})
            return
        old = await repo.get_item(conn, msg.old_item_id, lock=True)
        if old is not None:
            _same_vault(inc, old)
        try:
            plan = await _plan_reverse(conn, inc, msg, old, ctx.settings.allowed_roots())
        except _Refused as exc:
            await _refuse_reverse(conn, inc, msg, str(exc))
            return
        assert old is not None
        await _reverse(ctx, conn, inc, msg, old, plan)

    return {
        "RecoveryPointMaterialiseRequested": on_materialise,
        "ItemFailedOver": on_failed_over,
        "ItemFailoverCommitted": on_committed,
        "ReverseReplicationRequested": on_reverse,
    }


# ------------------------------------------------------------------ reverse replication


async def _plan_reverse(
    conn: asyncpg.Connection,
    inc: Incoming,
    msg: fo.ReverseReplicationRequested,
    old: dict[str, Any] | None,
    roots: list[Path],
) -> dict[str, Any]:
    """Check the request; the settings and clouds of the new item. `_Refused` says why not.
    Seed disks must lie under the materialise roots (after links)."""
    if old is None or not old["active"]:
        raise _Refused(f"protected item {msg.old_item_id} not found (or no longer active)")
    if ItemState(old["state"]) is not ItemState.FAILED_OVER:
        raise _Refused(
            f"item {msg.old_item_id} is in state '{old['state']}': reverse replication "
            "needs a failed-over item"
        )
    disk_ids = [d.disk_id for d in msg.disks]
    if len(set(disk_ids)) != len(disk_ids):
        raise _Refused(f"disk ids repeat: {disk_ids}")
    if msg.seed_disks:
        seeds = {s.disk_id: s.path for s in msg.seed_disks}
        if set(seeds) != set(disk_ids) or len(seeds) != len(msg.seed_disks):
            raise _Refused(
                f"seed_disks must name each disk once: disks {sorted(disk_ids)}, "
                f"seeds {sorted(s.disk_id for s in msg.seed_disks)}"
            )
        for disk_id, path in seeds.items():
            try:
                real = confined(path, roots)
            except OutsideRoots as exc:
                raise _Refused(f"seed disk {disk_id}: {exc}") from None
            if not await asyncio.to_thread(real.is_file):
                raise _Refused(f"seed disk {disk_id}: no image file at {path}")
    elif not msg.force_full_resync:
        raise _Refused(
            "no seed disks: set force_full_resync to copy every block, or give the old "
            "primary's disks as seed_disks"
        )
    agent = await repo.agent_by_id(conn, msg.source_agent_id)
    if agent is None or not agent["active"] or agent["vault_id"] != inc.envelope.vault_id:
        raise _Refused(f"no active host agent {msg.source_agent_id} in this vault")
    clash = await repo.active_item_for_vm(conn, old["vault_id"], msg.vm_id)
    if clash is not None and clash["item_id"] != old["item_id"]:
        raise _Refused(f"VM {msg.vm_id} is already protected (item {clash['item_id']})")
    settings = await repo.policy_settings(conn, old["vault_id"], old["policy_id"])
    old_source_cloud = await repo.pairing_source_cloud(
        conn, old["vault_id"], old["pairing_id"]
    ) or await repo.vm_cloud(conn, old["vault_id"], old["vm_id"])
    return {
        "settings": settings,
        "source_cloud_id": old["target_cloud_id"],
        "target_cloud_id": old_source_cloud or "",
    }


async def _refuse_reverse(
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
    await repo.insert_request(
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


async def _reverse(
    ctx: Context,
    conn: asyncpg.Connection,
    inc: Incoming,
    msg: fo.ReverseReplicationRequested,
    old: dict[str, Any],
    plan: dict[str, Any],
) -> None:
    vault_id = inc.envelope.vault_id
    await repo.drop_cycles(conn, old["item_id"])
    await change_state(
        conn,
        old,
        ItemState.NOT_ENABLED,
        reason=f"reverse replication: now protected as item {msg.new_item_id}",
        active=False,
    )
    await emit(
        conn,
        vault_id,
        ev.ProtectionDisabled(item_id=old["item_id"], vm_id=old["vm_id"], replica_deleted=False),
        str(old["item_id"]),
    )
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
    await repo.insert_request(
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
        await command(conn, item, enable_command(item, full))
    log.info(
        "reverse replication started",
        extra={
            "old_item": str(old["item_id"]),
            "new_item": str(msg.new_item_id),
            "seeded": seeded,
        },
    )


async def _seed_and_resync(ctx: Context, request: dict[str, Any]) -> None:
    """Seed the new item's replica from the old primary's images (point 1), then enable the
    new source agent `seeded` and ask it for a resync against those hashes. If seeding fails,
    fall back to a full resync (the item says why)."""
    msg = fo.ReverseReplicationRequested.model_validate(request["request"])
    item_key = str(msg.new_item_id)
    store = ctx.store(msg.target_site)
    source_time: datetime = request["created_at"]
    manifest = None
    failure = None
    try:
        roots = ctx.settings.allowed_roots()  # checked again: a link may have changed since
        images = {s.disk_id: confined(s.path, roots) for s in msg.seed_disks}
        manifest = await asyncio.to_thread(store.seed_from_images, item_key, 1, images, source_time)
    except (OSError, StoreError, ValueError) as exc:
        failure = f"seeding from the old primary's disks failed ({exc}); copying every block"
        log.warning(failure, extra={"item_id": item_key})
    async with ctx.pool.acquire() as conn, conn.transaction():
        item = await repo.get_item(conn, msg.new_item_id, lock=True)
        if item is None or not item["active"]:
            await repo.answer_request(conn, msg.request_id, "failed", None, None)
            return
        if not await repo.answer_request(conn, msg.request_id, "answered", None, None):
            return  # done by an earlier attempt
        settings = await repo.policy_settings(conn, item["vault_id"], item["policy_id"])
        settings = {
            **settings,
            "initial_replication": cmd.InitialReplication.SEEDED.value,
            "copy_frequency_seconds": settings.get(
                "copy_frequency_seconds", item["copy_interval_seconds"]
            ),
        }
        if manifest is not None:
            disks = [
                {"disk_id": d.disk_id, "size_bytes": d.size_bytes, "merkle_root": d.merkle_root}
                for d in manifest.disks
            ]
            changed = sum(len(d.changed) for d in manifest.disks)
            new_bytes = next(
                (p.new_bytes for p in await asyncio.to_thread(store.points, item_key)), 0
            )
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
        else:
            await repo.update_item(conn, msg.new_item_id, error=failure)
            item["error"] = failure
        await command(conn, item, enable_command(item, settings))
        await request_resync(ctx, conn, item)


# ------------------------------------------------------------------ materialise


REPLICA_WAIT_SECONDS = 30.0  # how long a handover waits for the replica to reach the point
REPLICA_POLL_SECONDS = 0.2  # how often it looks meanwhile


async def _hand_over(
    ctx: Context, request: dict[str, Any], item: dict[str, Any], point: dict[str, Any]
) -> bool:
    """A failover's disks from the recovery host's replica (handed over, or differencing disks
    over it for a test failover; no copy): True when the request was handed to the host, or
    waits for its replica to reach the point; False: copy here."""
    msg = fo.RecoveryPointMaterialiseRequested.model_validate(request["request"])
    seq = point["cycle_seq"]
    if not (msg.handover or msg.differencing) or item["recovery_agent_id"] is None:
        return False
    if request["request"].get("replica_refused"):
        return False  # the host tried and could not: copy
    if (item["replica_seq"] or 0) < seq:
        waited = (datetime.now(UTC) - request["created_at"]).total_seconds()
        if waited >= REPLICA_WAIT_SECONDS:
            return False
        # the last point is being applied there: look again soon, not at the next interval
        asyncio.get_running_loop().call_later(REPLICA_POLL_SECONDS, ctx.failover_wake.set)
        return True
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await repo.delegate_request(conn, msg.request_id):
            return True
        kind = cmd.DifferencingDisksRequested if msg.differencing else cmd.ReplicaHandoverRequested
        await emit(
            conn,
            item["vault_id"],
            kind(
                command_id=uuid.uuid5(msg.request_id, f"replica-{kind.__name__}"),
                agent_id=item["recovery_agent_id"],
                item_id=msg.item_id,
                request_id=msg.request_id,
                cycle_seq=seq,
                target_dir=msg.target_dir,
                disks=[
                    cmd.ReplicaDisk(
                        disk_id=d["disk_id"],
                        size_bytes=d["size_bytes"],
                        block_size=d.get("block_size", 65536),
                        merkle_root=d["merkle_root"],
                    )
                    for d in point["disks"]
                ],
            ),
            str(item["recovery_agent_id"]),
        )
    log.info(
        "failover disks asked of the recovery host's replica",
        extra={
            "request_id": str(msg.request_id),
            "item_id": str(msg.item_id),
            "seq": seq,
            "differencing": msg.differencing,
        },
    )
    return True


def make_replica_answers(ctx: Context) -> dict[str, Handler]:
    """Handlers of the recovery host's `CommandCompleted` for a handover, by command type."""

    async def on_handover(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, cmd.CommandCompleted)
        try:
            request_id = uuid.UUID(str(msg.result.get("request_id")))
        except ValueError:
            request_id = None
        request = await repo.get_request(conn, request_id) if request_id else None
        if request is None:
            raise Rejected("invalid_result", "a handover answer names no known request")
        item = await repo.get_item(conn, request["item_id"])
        if item is None or str(item["recovery_agent_id"]) != inc.envelope.producer_id:
            raise Rejected("wrong_agent", "handover answer from a host that keeps no replica")
        if request["state"] != "delegated":
            return  # answered already
        if msg.outcome is cmd.CommandOutcome.FAILED:
            log.warning(
                "the recovery host could not hand its replica over; copying",
                extra={"request_id": str(request_id), "error": msg.error},
            )
            await repo.undelegate_request(conn, request["request_id"], msg.error)
            ctx.failover_wake.set()
            return
        seq = msg.result.get("cycle_seq")
        point = next(
            (p for p in await repo.live_points(conn, item["item_id"]) if p["cycle_seq"] == seq),
            None,
        )
        if point is None:
            raise Rejected("invalid_result", f"handover of point {seq}, which is not retained")
        roots = {d["disk_id"]: d["merkle_root"] for d in point["disks"]}
        answer = fo.RecoveryPointMaterialised(
            request_id=request["request_id"],
            item_id=item["item_id"],
            cycle_seq=seq,
            source_time=point["source_time"],
            app_consistent=point["point_type"] == ev.RecoveryPointType.APP_CONSISTENT.value,
            disks=[
                fo.MaterialisedDisk(
                    disk_id=d["disk_id"],
                    path=d["path"],
                    size_bytes=d["size_bytes"],
                    merkle_root=roots[d["disk_id"]],
                )
                for d in msg.result.get("disks", [])
                if d.get("disk_id") in roots
            ],
        )
        if await repo.answer_request(
            conn,
            request["request_id"],
            "answered",
            type(answer).__name__,
            answer.model_dump(mode="json"),
        ):
            await emit(conn, request["vault_id"], answer, str(request["item_id"]))

    return {"ReplicaHandoverRequested": on_handover, "DifferencingDisksRequested": on_handover}


async def _materialise(ctx: Context, request: dict[str, Any]) -> EventPayload | None:
    """Write the point's disks into the target folder (or hand the request to the recovery
    host's replica: None, answered when the host answers); the answer to publish."""
    msg = fo.RecoveryPointMaterialiseRequested.model_validate(request["request"])

    def failed(why: str) -> fo.RecoveryPointMaterialiseFailed:
        log.warning("materialise failed", extra={"request_id": str(msg.request_id), "error": why})
        return fo.RecoveryPointMaterialiseFailed(
            request_id=msg.request_id, item_id=msg.item_id, error=why
        )

    async with ctx.pool.acquire() as conn:
        item = await repo.get_item(conn, msg.item_id)
        live = await repo.live_points(conn, msg.item_id) if item else []
    if item is None or item["vault_id"] != request["vault_id"]:
        return failed(f"protected item {msg.item_id} not found")
    try:
        seq = domain.choose_point(
            [domain.PointRef(p["cycle_seq"], p["point_type"] == "app_consistent") for p in live],
            msg.choice.value,
            msg.cycle_seq,
            held=item["replica_seq"] if msg.differencing and item["recovery_agent_id"] else None,
        )
    except domain.ReplicationError as exc:
        return failed(exc.message)
    point = next(p for p in live if p["cycle_seq"] == seq)
    try:
        target = await asyncio.to_thread(
            materialise_target, ctx.settings, msg.target_dir, [d["disk_id"] for d in point["disks"]]
        )
    except ValueError as exc:
        return failed(str(exc))
    if await _hand_over(ctx, request, item, point):
        return None
    store = ctx.store(item["target_site"])
    disks = []
    try:
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        for disk in point["disks"]:
            out = target / f"{disk['disk_id']}.vhdx"
            digest = await asyncio.to_thread(
                store.materialise, str(msg.item_id), seq, disk["disk_id"], out, verify=True
            )
            disks.append(
                fo.MaterialisedDisk(
                    disk_id=disk["disk_id"],
                    path=str(out),
                    size_bytes=disk["size_bytes"],
                    sha256=digest,
                    merkle_root=disk["merkle_root"],
                )
            )
    except (OSError, StoreError) as exc:
        return failed(f"recovery point {seq} could not be written to {target}: {exc}")
    log.info(
        "recovery point materialised",
        extra={"request_id": str(msg.request_id), "item_id": str(msg.item_id), "seq": seq},
    )
    return fo.RecoveryPointMaterialised(
        request_id=msg.request_id,
        item_id=msg.item_id,
        cycle_seq=seq,
        source_time=point["source_time"],
        app_consistent=point["point_type"] == ev.RecoveryPointType.APP_CONSISTENT.value,
        disks=disks,
    )


async def _record_answer(ctx: Context, request: dict[str, Any], answer: EventPayload) -> None:
    state = "failed" if isinstance(answer, fo.RecoveryPointMaterialiseFailed) else "answered"
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await repo.answer_request(
            conn,
            request["request_id"],
            state,
            type(answer).__name__,
            answer.model_dump(mode="json"),
        ):
            await emit(conn, request["vault_id"], answer, str(request["item_id"]))


# ------------------------------------------------------------------ the worker


async def _work_on(ctx: Context, request: dict[str, Any]) -> None:
    try:
        if request["kind"] == "materialise":
            answer = await _materialise(ctx, request)
            if answer is not None:
                await _record_answer(ctx, request, answer)
        else:
            await _seed_and_resync(ctx, request)
    except Exception as exc:
        async with ctx.pool.acquire() as conn:
            attempts = await repo.bump_request_attempts(conn, request["request_id"])
        log.exception(
            "failover request failed; retrying",
            extra={"request_id": str(request["request_id"]), "attempt": attempts},
        )
        if attempts >= MAX_ATTEMPTS and request["kind"] == "materialise":
            await _record_answer(
                ctx,
                request,
                fo.RecoveryPointMaterialiseFailed(
                    request_id=request["request_id"],
                    item_id=request["item_id"],
                    error=f"gave up after {attempts} attempts: {type(exc).__name__}: {exc}",
                ),
            )


async def work_on_pending_requests(ctx: Context) -> int:
    """One pass over the pending requests (a few at a time); returns how many were taken."""
    async with ctx.pool.acquire() as conn:
        pending = await repo.pending_requests(conn, BATCH)
    if pending:
        await asyncio.gather(*(_work_on(ctx, r) for r in pending))
    return len(pending)


async def failover_worker(ctx: Context) -> None:
    """Work on pending requests as soon as a handler records one (or every interval)."""
    while True:
        ctx.failover_wake.clear()
        await work_on_pending_requests(ctx)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.failover_wake.wait(), ctx.settings.health_interval_seconds)

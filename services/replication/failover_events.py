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

This module holds the event handlers; `materialise.py` writes or hands over a point's disks,
`reverse.py` carries out reverse replication and `failover_worker.py` works on the recorded
requests.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from functools import partial
from typing import Any

import asyncpg

from services.replication import leaves
from services.replication import repository as repo
from services.replication import request_repository as request_repo
from services.replication.context import Context, emit
from services.replication.reverse import Refused, plan_reverse, refuse_reverse, start_reverse
from services.replication.unit_of_work import ItemUnitOfWork
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming, Rejected
from shared.schemas import failover as fo
from shared.schemas import replication as ev
from shared.schemas.envelope import EventPayload
from shared.schemas.replication import ItemState

log = logging.getLogger(__name__)

REQUESTER = "service:failover"


def _check_requester(inc: Incoming) -> None:
    if inc.envelope.producer_id != REQUESTER:
        raise Rejected(
            "not_failover_service",
            f"{inc.envelope.type} is accepted only from {REQUESTER}, "
            f"not {inc.envelope.producer_id}",
        )


def _same_vault(inc: Incoming, vault_id: uuid.UUID) -> None:
    if vault_id != inc.envelope.vault_id:
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


async def on_materialise(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, fo.RecoveryPointMaterialiseRequested)
    _check_requester(inc)
    known = await request_repo.get_request(conn, msg.request_id)
    if known is not None:
        await _answer_again(conn, known)
        return
    item = await repo.get_item(conn, msg.item_id)
    if item is not None:
        _same_vault(inc, item["vault_id"])
    await request_repo.insert_request(
        conn,
        request_id=msg.request_id,
        kind="materialise",
        vault_id=inc.envelope.vault_id,
        item_id=msg.item_id,
        request=msg.model_dump(mode="json"),
    )
    ctx.failover_wake.set()


async def on_failed_over(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, fo.ItemFailedOver)
    _check_requester(inc)
    async with ItemUnitOfWork(conn) as uow:
        item = await uow.load(msg.item_id)
        if item is None or not item.active:
            log.warning("failover of an unknown item ignored", extra={"item_id": str(msg.item_id)})
            return
        _same_vault(inc, item.vault_id)
        if item.state is ItemState.FAILED_OVER:
            log.info("item already failed over", extra={"item_id": str(msg.item_id)})
            return
        refusal = item.failover_refusal()
        if refusal is not None:
            log.warning(
                "failover refused",
                extra={"item_id": str(msg.item_id), "reason": f"cannot fail over: {refusal}"},
            )
            return
        await repo.drop_cycles(conn, msg.item_id)
        item.fail_over(
            f"{msg.kind.value} failover to recovery point {msg.cycle_seq}: VM "
            f"{msg.recovery_vm_name} runs at the recovery site"
        )
        await uow.commit()


async def on_committed(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, fo.ItemFailoverCommitted)
    _check_requester(inc)
    async with ItemUnitOfWork(conn) as uow:
        item = await uow.load(msg.item_id)
        if item is None:
            log.warning("commit of an unknown item ignored", extra={"item_id": str(msg.item_id)})
            return
        _same_vault(inc, item.vault_id)
        if item.state is not ItemState.FAILED_OVER:
            log.warning(
                "commit refused: the item is not failed over",
                extra={"item_id": str(msg.item_id), "state": item.state.value},
            )
            return
        live = {p["cycle_seq"]: p for p in await repo.live_points(conn, msg.item_id)}
        if msg.cycle_seq not in live:
            log.warning(
                "commit refused: the recovery point is not retained",
                extra={"item_id": str(msg.item_id), "cycle_seq": msg.cycle_seq},
            )
            return
        item.drop_site_replica()  # the VM runs on its own disks now
        await leaves.forget(conn, msg.item_id)  # and no cycle of this item will come
        drop = sorted(s for s in live if s != msg.cycle_seq)
        if drop:
            store = ctx.store(item.target_site)
            await asyncio.to_thread(
                store.prune, str(msg.item_id), {msg.cycle_seq}, truncate=True
            )  # crash-safe and idempotent: a retry after a failed transaction finds nothing
            await repo.mark_pruned(conn, msg.item_id, drop)
            item.keep_only_point(msg.cycle_seq, live[msg.cycle_seq]["source_time"], drop)
        await uow.commit()
    if drop:
        log.info(
            "failover committed",
            extra={"item_id": str(msg.item_id), "kept": msg.cycle_seq, "pruned": drop},
        )


async def on_reverse(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, fo.ReverseReplicationRequested)
    _check_requester(inc)
    known = await request_repo.get_request(conn, msg.request_id)
    if known is not None:
        await _answer_again(conn, known)
        return
    if await repo.get_item(conn, msg.new_item_id) is not None:
        log.info("reverse item exists already", extra={"item": str(msg.new_item_id)})
        return
    old = await repo.get_item(conn, msg.old_item_id, lock=True)
    if old is not None:
        _same_vault(inc, old["vault_id"])
    try:
        roots = ctx.settings.allowed_roots() if ctx.settings.keep_block_copy else None
        plan = await plan_reverse(conn, inc, msg, old, roots)
    except Refused as exc:
        await refuse_reverse(conn, inc, msg, str(exc))
        return
    assert old is not None
    await start_reverse(ctx, conn, inc, msg, old, plan)


def make_failover_handlers(ctx: Context) -> dict[str, Handler]:
    return {
        "RecoveryPointMaterialiseRequested": partial(on_materialise, ctx),
        "ItemFailedOver": partial(on_failed_over, ctx),
        "ItemFailoverCommitted": partial(on_committed, ctx),
        "ReverseReplicationRequested": partial(on_reverse, ctx),
    }

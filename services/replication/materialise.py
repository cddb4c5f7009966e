"""Materialising a recovery point for the failover service (`RecoveryPointMaterialiseRequested`,
worked on by the failover worker): every disk written into `target_dir/<disk_id>.vhdx` from
the replica store, verified block by block, or the request handed to the recovery host that
keeps the item's replica (handover, or differencing disks for a test failover) and its answer
turned into `RecoveryPointMaterialised`. Each answer is recorded with the request and enqueued
in the outbox in one transaction, so it is given exactly once. The point chosen is noted with
the request: retention keeps it until the request is answered (`retention.pinned_seqs`)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg

from services.replication import domain
from services.replication import repository as repo
from services.replication import request_repository as request_repo
from services.replication.config import ReplicationSettings
from services.replication.context import Context, emit
from services.replication.item import DEFAULT_BLOCK_SIZE
from services.replication.store import StoreError
from shared.files import OutsideRoots, confined, unusable_file_names
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming, Rejected
from shared.schemas import agent as cmd
from shared.schemas import failover as fo
from shared.schemas import replication as ev
from shared.schemas.envelope import EventPayload

log = logging.getLogger(__name__)


def materialise_target(
    settings: ReplicationSettings, target_dir: str, disk_ids: list[str], *, local: bool = True
) -> Path:
    """The folder a point's disks are written to, `target_dir` resolved: it must lie under a
    materialise root (after links), hold no VM (vm.json) and every disk id must be usable as a
    file name. ValueError says what is wrong. `local` False: the folder is the recovery
    host's, which checks it against its own storage; only the disk ids are checked here."""
    if not local:
        if not Path(target_dir).is_absolute():
            raise ValueError(f"target_dir {target_dir!r} is not an absolute path")
        bad = unusable_file_names(disk_ids)
        if bad:
            raise ValueError(f"disk ids unusable as file names: {bad}")
        return Path(target_dir)
    try:
        target = confined(target_dir, settings.allowed_roots())
    except OutsideRoots as exc:
        raise ValueError(f"target_dir is not under a materialise root: {exc}") from None
    if (target / "vm.json").exists():
        raise ValueError(f"target_dir {target} holds a VM (vm.json): its disks are not overwritten")
    bad = unusable_file_names(disk_ids)
    if bad:
        raise ValueError(f"disk ids unusable as file names: {bad}")
    return target


def requested(request: dict[str, Any]) -> fo.RecoveryPointMaterialiseRequested:
    """The failover's request as it was asked (without what this service noted on it: why
    the recovery host refused it, `replica_refused`)."""
    asked = {k: v for k, v in request["request"].items() if k != "replica_refused"}
    return fo.RecoveryPointMaterialiseRequested.model_validate(asked)


REPLICA_WAIT_SECONDS = 30.0  # how long a handover waits for the replica to reach the point
REPLICA_POLL_SECONDS = 0.2  # how often it looks meanwhile


async def _hand_over(
    ctx: Context, request: dict[str, Any], item: dict[str, Any], point: dict[str, Any]
) -> bool:
    """A failover's disks from the recovery host's replica (handed over, or differencing disks
    over it for a test failover; no copy here), or, for a request that asks for a copy of an
    item whose blocks this service does not keep, exported by the host into the target folder
    (a folder of its storage): True when the request was handed to the host, or waits for its
    replica to reach the point; False: copy here (or fail without a block copy)."""
    msg = requested(request)
    seq = point["cycle_seq"]
    copy = not (msg.handover or msg.differencing)
    if item["recovery_agent_id"] is None or (copy and ctx.keeps_blocks(item["recovery_agent_id"])):
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
        if not await request_repo.delegate_request(conn, msg.request_id):
            return True
        kind: type[
            cmd.DifferencingDisksRequested
            | cmd.ReplicaHandoverRequested
            | cmd.ReplicaPointExportRequested
        ] = (
            cmd.DifferencingDisksRequested
            if msg.differencing
            else cmd.ReplicaHandoverRequested
            if msg.handover
            else cmd.ReplicaPointExportRequested
        )
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
                disks=replica_disks(point["disks"]),
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


def replica_disks(disks: list[dict[str, Any]]) -> list[cmd.ReplicaDisk]:
    """A point's disks (its row's `disks`) as the recovery host's commands name them."""
    return [
        cmd.ReplicaDisk(
            disk_id=d["disk_id"],
            size_bytes=d["size_bytes"],
            block_size=d.get("block_size", DEFAULT_BLOCK_SIZE),
            merkle_root=d["merkle_root"],
        )
        for d in disks
    ]


def result_request_id(msg: cmd.CommandCompleted) -> uuid.UUID | None:
    """The request an agent's answer names in its result, if any."""
    try:
        return uuid.UUID(str(msg.result.get("request_id")))
    except ValueError:
        return None


async def answered_request(
    conn: asyncpg.Connection, inc: Incoming, request_id: uuid.UUID | None, what: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The failover request `request_id` a recovery host answers (`what`: its answer) and the
    request's item; Rejected unless the request exists and `inc` comes from the host that
    keeps the item's replica."""
    request = await request_repo.get_request(conn, request_id) if request_id else None
    if request is None:
        raise Rejected("invalid_result", f"{what} names no known request")
    item = await repo.get_item(conn, request["item_id"])
    if item is None or str(item["recovery_agent_id"]) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", f"{what} from a host that keeps no replica")
    return request, item


async def on_handover(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    request_id = result_request_id(msg)
    request, item = await answered_request(conn, inc, request_id, "a handover answer")
    if request["state"] != "delegated":
        return  # answered already
    failure = msg.error if msg.outcome is cmd.CommandOutcome.FAILED else None
    if failure is None and msg.result.get("ok") is False:  # an export whose roots differ
        failure = "the point read from the replica does not give the source's Merkle roots"
    if failure is not None:
        log.warning(
            "the recovery host could not provide the point; copying if this service can",
            extra={"request_id": str(request_id), "error": failure},
        )
        await request_repo.undelegate_request(conn, request["request_id"], failure)
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
                sha256=d.get("sha256"),  # an export's
                merkle_root=roots[d["disk_id"]],
            )
            for d in msg.result.get("disks", [])
            if d.get("disk_id") in roots
        ],
    )
    if await request_repo.answer_request(
        conn,
        request["request_id"],
        "answered",
        type(answer).__name__,
        answer.model_dump(mode="json"),
    ):
        await emit(conn, request["vault_id"], answer, str(request["item_id"]))


def make_replica_answers(ctx: Context) -> dict[str, Handler]:
    """Handlers of the recovery host's `CommandCompleted` for a handover, by command type
    (an export's: services/replication/host_points.py, which passes a failover's here)."""
    handler = partial(on_handover, ctx)
    return {"ReplicaHandoverRequested": handler, "DifferencingDisksRequested": handler}


async def choose_and_pin(
    ctx: Context, msg: fo.RecoveryPointMaterialiseRequested, vault_id: uuid.UUID
) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """The item and the live point to materialise, or why there is none. The point is noted
    with the request under the item's points lock, so retention keeps it (pinned) until the
    request is answered: a retention pass decides either before (the point is still live
    here) or after (it sees the pin)."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_item_points(conn, msg.item_id)
        item = await repo.get_item(conn, msg.item_id)
        if item is None or item["vault_id"] != vault_id:
            return f"protected item {msg.item_id} not found"
        live = await repo.live_points(conn, msg.item_id)
        try:
            seq = domain.choose_point(
                [
                    domain.PointRef(p["cycle_seq"], p["point_type"] == "app_consistent")
                    for p in live
                ],
                msg.choice.value,
                msg.cycle_seq,
                held=item["replica_seq"]
                if msg.differencing and item["recovery_agent_id"]
                else None,
            )
        except domain.ReplicationError as exc:
            return exc.message
        await request_repo.note_request_point(conn, msg.request_id, seq)
    return item, next(p for p in live if p["cycle_seq"] == seq)


async def materialise(ctx: Context, request: dict[str, Any]) -> EventPayload | None:
    """Write the point's disks into the target folder (or hand the request to the recovery
    host's replica: None, answered when the host answers); the answer to publish."""
    msg = requested(request)

    def failed(why: str) -> fo.RecoveryPointMaterialiseFailed:
        log.warning("materialise failed", extra={"request_id": str(msg.request_id), "error": why})
        return fo.RecoveryPointMaterialiseFailed(
            request_id=msg.request_id, item_id=msg.item_id, error=why
        )

    chosen = await choose_and_pin(ctx, msg, request["vault_id"])
    if isinstance(chosen, str):
        return failed(chosen)
    item, point = chosen
    seq = point["cycle_seq"]
    try:
        target = await asyncio.to_thread(
            partial(
                materialise_target,
                ctx.settings,
                msg.target_dir,
                [d["disk_id"] for d in point["disks"]],
                local=ctx.keeps_blocks(item["recovery_agent_id"]),
            )
        )
    except ValueError as exc:
        return failed(str(exc))
    if await _hand_over(ctx, request, item, point):
        return None
    if not ctx.keeps_blocks(item["recovery_agent_id"]):
        why = request["request"].get("replica_refused") or (
            f"its replica did not reach point {seq} within {REPLICA_WAIT_SECONDS:.0f} s"
        )
        return failed(
            f"recovery point {seq} is kept only by the recovery host's replica (agent "
            f"{item['recovery_agent_id']}), and the host could not provide it: {why}; start the "
            "host's agent and retry, or pick a point its replica holds"
        )
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


async def record_answer(ctx: Context, request: dict[str, Any], answer: EventPayload) -> None:
    state = "failed" if isinstance(answer, fo.RecoveryPointMaterialiseFailed) else "answered"
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await request_repo.answer_request(
            conn,
            request["request_id"],
            state,
            type(answer).__name__,
            answer.model_dump(mode="json"),
        ):
            await emit(conn, request["vault_id"], answer, str(request["item_id"]))

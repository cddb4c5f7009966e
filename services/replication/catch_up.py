"""A recovery host's replica that missed points catches up. Its host was down past its replica
feed's retention (or lost the commands): the next point cannot follow what the replica holds,
and the host says which point it is at (`replica_seq` in its failed answer).

1. The item goes to resync (`ProtectedItem.replica_behind`, `require_resync`); the resync
   first asks the host for the leaf hashes of the point its replica is at
   (`ReplicaLeavesRequested`; reported as a seed's are, `ReplicaLeavesReported`, kept in
   `seed_leaves` under the request id until the answer).
2. On the answer the leaves must give the roots the host reports. The source agent is then
   asked for the blocks that differ from a merge of them and the item's latest verified
   leaves: where the two agree, that hash; where they differ, one no block has. So the resync
   cycle's blocks turn both the latest point (as the service verifies it) and the replica's
   point (as the host applies it) into the source's disks.
3. The resync's point is applied over the replica's (`ReplicaPointApplyRequested.follows`);
   the points between were never on the replica and, without a block copy here, exist
   nowhere: they are pruned (`RecoveryPointsPruned`) once the host holds the new point.

A replica that holds nothing (point 0) gets every block. A host that cannot report retries
with the resync's backoff."""

from __future__ import annotations

import logging
import uuid

import asyncpg

from services.replication import reported_leaves
from services.replication import repository as repo
from services.replication.context import Context
from services.replication.item import ProtectedItem
from services.replication.materialise import result_request_id
from services.replication.resync import latest_hashes, require_resync
from services.replication.unit_of_work import ItemUnitOfWork
from shared.kafka.decode import Incoming, Rejected
from shared.merkle import HASH_SIZE, MerkleTree, block_count
from shared.schemas import agent as cmd

log = logging.getLogger(__name__)

# A leaf hash no block has: where the replica and the latest point differ, the block is sent.
UNMATCHABLE = b"\xff" * HASH_SIZE


def merged_hashes(latest: list[bytes], replica: bytes) -> list[bytes]:
    """The hashes a catch-up resync runs against: `latest[i]` where the replica's leaf `i`
    (32-byte digests, concatenated) is the same, else UNMATCHABLE (also past the replica's
    end: the disk grew since)."""
    held = len(replica) // HASH_SIZE
    return [
        leaf if i < held and replica[i * HASH_SIZE : (i + 1) * HASH_SIZE] == leaf else UNMATCHABLE
        for i, leaf in enumerate(latest)
    ]


async def on_replica_behind(
    ctx: Context,
    conn: asyncpg.Connection,
    item: ProtectedItem,
    held: int,
    error: str,
    asked: int | None,
) -> None:
    """A failed apply of point `asked` that says the replica is at point `held`: the item
    catches up if it must (`ProtectedItem.replica_behind`). The caller commits the item."""
    if item.replica_behind(held, error, asked):
        log.warning(
            "replica missed points: catching up",
            extra={"item_id": str(item.item_id), "replica_seq": held, "error": error},
        )
        await require_resync(
            ctx, conn, item, f"the recovery host's replica missed the points after {held}"
        )


async def on_leaves_reported(conn: asyncpg.Connection, inc: Incoming) -> bool:
    """Keep a report of a catch-up's leaves (True), if the item waits for this request from
    this host; False: not a catch-up's (a seed's, services/replication/seeding.py)."""
    msg = inc.payload
    assert isinstance(msg, cmd.ReplicaLeavesReported)
    item = await repo.get_item(conn, msg.item_id)
    if item is None or item["replica_catchup_id"] != msg.request_id:
        return False
    if str(item["recovery_agent_id"]) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", "leaves of a replica this agent does not keep")
    await reported_leaves.keep(conn, msg.request_id, msg)
    return True


async def load_host_item(
    uow: ItemUnitOfWork, inc: Incoming, what: str, wrong: str
) -> ProtectedItem:
    """The item a recovery host's `CommandCompleted` is about (its result's `item_id`), if
    that host keeps the item's replica; Rejected otherwise (`what`: the answer, `wrong`: why
    another host's is refused)."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    try:
        item_id = uuid.UUID(str(msg.result.get("item_id")))
    except ValueError:
        raise Rejected("invalid_result", f"{what} names no item") from None
    item = await uow.load(item_id)
    if item is None or str(item.recovery_agent_id) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", wrong)
    return item


async def on_leaves_answered(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    """The host's answer to `ReplicaLeavesRequested`: the source asked for the blocks that
    differ from the merged leaves, or, if the host failed or its leaves do not add up, the
    request retried after the resync's backoff."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    request_id = result_request_id(msg)
    async with ItemUnitOfWork(conn) as uow:
        item = await load_host_item(
            uow, inc, "a replica's leaves answer", "leaves of a replica this agent does not keep"
        )
        if request_id is None or not item.replica_leaves_answered(request_id):
            return  # answered already, or a catch-up given up since
        replica, failure = _reported(msg, await reported_leaves.take(conn, request_id))
        held = msg.result.get("cycle_seq")
        if failure is not None:
            await require_resync(ctx, conn, item, f"replica catch-up: {failure}")
        else:
            latest = await latest_hashes(ctx, conn, item)
            hashes = {
                d: merged_hashes(hashes, replica[d]) for d, hashes in latest.items() if d in replica
            }
            item.replica_follows = held  # what the replica is at now (it may have moved)
            item.request_resync(hashes, uuid.uuid4())
            log.info(
                "replica catch-up: resync against the replica's leaves",
                extra={"item_id": str(item.item_id), "replica_seq": held},
            )
        await uow.commit()


def _reported(
    msg: cmd.CommandCompleted, rows: list[asyncpg.Record]
) -> tuple[dict[str, bytes], str | None]:
    """Each disk's leaves the host reported (checked against the roots it answered), or why
    its answer cannot be used."""
    if msg.outcome is cmd.CommandOutcome.FAILED:
        return {}, f"the recovery host could not report its replica's leaves ({msg.error})"
    roots = msg.result.get("roots")
    if not isinstance(roots, dict) or not isinstance(msg.result.get("cycle_seq"), int):
        return {}, "the recovery host's answer has no cycle_seq and roots"
    disks, failure = reported_leaves.assembled(rows, sorted(roots))
    if failure is not None:
        return {}, failure
    for disk_id, (size, block_size, leaves) in disks.items():
        count = block_count(size, block_size)
        tree = MerkleTree.from_leaves(
            (leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE] for i in range(count)), count
        )
        if tree.root_hex() != roots[disk_id]:
            return {}, f"disk {disk_id}: the reported leaves do not give the reported root"
    return {d: leaves for d, (_, _, leaves) in disks.items()}, None


async def after_applied(
    ctx: Context, conn: asyncpg.Connection, item: ProtectedItem, skipped: list[int]
) -> None:
    """The catch-up's point is on the replica: the points it skipped are pruned if they are
    nowhere else (no block copy here). The caller commits the item."""
    if not skipped or ctx.keeps_blocks(item.recovery_agent_id):
        return
    live = {p["cycle_seq"] for p in await repo.live_points(conn, item.item_id)}
    gone = [s for s in skipped if s in live]
    if gone:
        await repo.mark_pruned(conn, item.item_id, gone)
        item.points_pruned(gone)
        log.warning(
            "recovery points the replica missed pruned",
            extra={"item_id": str(item.item_id), "cycle_seqs": gone},
        )

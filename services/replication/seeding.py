"""Seeding a reverse-replicated item's replica at its recovery host, for an item whose blocks
this service does not keep: the host (the old primary, where the VM ran) builds the replica
from its own disks as point 1 (`ReplicaSeedRequested`) and reports every leaf hash
(`ReplicaLeavesReported`, in chunks) before it answers (`CommandCompleted`). The leaves are
kept until the answer (`seed_leaves`); then they must give the roots the host reports, they
become the item's verified leaves (services/replication/leaves.py), point 1 is recorded and the
new source agent is asked for a resync against them: only the blocks that differ travel, and
nothing reads the old primary's files but its own agent. A host that cannot seed (or leaves
that do not add up) makes the item copy every block, and says why."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from functools import partial
from typing import Any

import asyncpg

from services.replication import catch_up, leaves, reported_leaves
from services.replication import request_repository as request_repo
from services.replication.context import Context, emit
from services.replication.materialise import answered_request, result_request_id
from services.replication.reverse import Seed, finish_seeding
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming, Rejected
from shared.merkle import BLOCK_SIZE, HASH_SIZE, zero_block_hash
from shared.schemas import agent as cmd
from shared.schemas import failover as fo

log = logging.getLogger(__name__)


async def ask_host_to_seed(ctx: Context, request: dict[str, Any], item: dict[str, Any]) -> None:
    """Hand the reverse request to the item's recovery host: seed its replica from the seed
    disks, which are its own files (answered by `on_seeded`)."""
    msg = fo.ReverseReplicationRequested.model_validate(request["request"])
    sizes = {d.disk_id: d.size_bytes for d in msg.disks}
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await request_repo.delegate_request(conn, msg.request_id):
            return  # handed over already
        await emit(
            conn,
            item["vault_id"],
            cmd.ReplicaSeedRequested(
                command_id=uuid.uuid5(msg.request_id, "replica-seed"),
                agent_id=item["recovery_agent_id"],
                item_id=msg.new_item_id,
                request_id=msg.request_id,
                cycle_seq=1,
                disks=[
                    cmd.SeedImage(
                        disk_id=s.disk_id,
                        path=s.path,
                        size_bytes=sizes[s.disk_id],
                        block_size=BLOCK_SIZE,
                    )
                    for s in msg.seed_disks
                ],
            ),
            str(item["recovery_agent_id"]),
        )
    log.info(
        "replica seeding asked of the recovery host",
        extra={"item_id": str(msg.new_item_id), "agent_id": str(item["recovery_agent_id"])},
    )


async def _seed_request(
    conn: asyncpg.Connection, inc: Incoming, request_id: uuid.UUID | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reverse request `request_id` and its item, if `inc` comes from the item's
    recovery host; Rejected otherwise."""
    request, item = await answered_request(conn, inc, request_id, "a seeding report")
    if request["kind"] != "reverse":
        raise Rejected("invalid_result", "a seeding report names no known reverse request")
    return request, item


async def on_leaves_reported(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    """Leaves of a seed (kept until the answer), or of a catch-up
    (services/replication/catch_up.py)."""
    msg = inc.payload
    assert isinstance(msg, cmd.ReplicaLeavesReported)
    if await catch_up.on_leaves_reported(conn, inc):
        return
    request, item = await _seed_request(conn, inc, msg.request_id)
    if item["item_id"] != msg.item_id:
        raise Rejected("invalid_result", "leaves of another item than the request's")
    await reported_leaves.keep(conn, request["request_id"], msg)


async def on_seeded(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    """The host's answer: point 1 recorded from the reported leaves, checked against the
    reported roots, and the new source asked for a resync; or, if it failed, every block."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    request, item = await _seed_request(conn, inc, result_request_id(msg))
    if request["state"] != "delegated":
        return  # answered already
    reverse = fo.ReverseReplicationRequested.model_validate(request["request"])
    disk_ids = [d.disk_id for d in reverse.disks]
    rows = await reported_leaves.take(conn, request["request_id"])
    seed, failure = None, None
    if msg.outcome is cmd.CommandOutcome.FAILED:
        failure = f"the old primary's host could not seed the replica ({msg.error})"
    else:
        disks, failure = reported_leaves.assembled(rows, disk_ids)
        roots = msg.result.get("roots") or {}
        if failure is None:
            try:
                await leaves.advance(
                    conn,
                    item["item_id"],
                    None,
                    1,
                    [
                        leaves.DiskTarget(d, disks[d][0], disks[d][1], str(roots.get(d)))
                        for d in disk_ids
                    ],
                    {},
                    partial(_reported, disks),
                )
            except leaves.LeavesMismatch as exc:
                failure = f"the seeded replica's reported leaves and roots disagree: {exc}"
        if failure is None:
            seed = Seed(
                disks=[
                    {"disk_id": d, "size_bytes": disks[d][0], "merkle_root": roots[d]}
                    for d in disk_ids
                ],
                changed_blocks=sum(_non_zero(*disks[d]) for d in disk_ids),
                new_bytes=0,  # nothing travelled: the host's own disks
            )
    if failure is not None:
        failure = f"reverse replication: {failure}; copying every block"
        log.warning(failure, extra={"item_id": str(item["item_id"])})
    await finish_seeding(ctx, conn, request, seed, failure, replica_holds_it=seed is not None)


async def _reported(
    disks: Mapping[str, tuple[int, int, bytes]], target: leaves.DiskTarget
) -> tuple[int, bytes] | None:
    """(size, leaves) the host reported for the target's disk."""
    size, _, hashes = disks[target.disk_id]
    return size, hashes


def _non_zero(size: int, block_size: int, hashes: bytes) -> int:
    """How many of a disk's blocks are not zero blocks (the seed's changed blocks)."""
    full = zero_block_hash(block_size)
    n = len(hashes) // HASH_SIZE
    count = sum(1 for i in range(n) if hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE] != full)
    tail = size % block_size
    if n and tail and hashes[-HASH_SIZE:] == zero_block_hash(tail):
        count -= 1  # a short last block of zeros
    return count


def make_seeding_handlers(ctx: Context) -> tuple[dict[str, Handler], dict[str, Handler]]:
    """(agent event handlers by event type, `CommandCompleted` handlers by command type)."""
    return (
        {"ReplicaLeavesReported": partial(on_leaves_reported, ctx)},
        {"ReplicaSeedRequested": partial(on_seeded, ctx)},
    )

"""The delta pipeline's `prepare` step: a chunk's blocks decoded, verified and made durable in
the replica store before its records are handled (`delta_handlers`), and a shipped block's
bytes checked against its disk (`block_bytes`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from services.replication import repository as repo
from services.replication.context import Context
from shared.delta_blocks import decode_data
from shared.kafka.consumers import RUN_MEMO
from shared.kafka.decode import Rejected
from shared.merkle import block_count, block_length, zero_block_hash
from shared.readmodels import signature_verifier
from shared.schemas import replication as ev
from shared.schemas.envelope import EventPayload


def make_delta_prepare(ctx: Context) -> Callable[[list[tuple[Any, EventPayload]]], Awaitable[None]]:
    """The delta pipeline's `prepare` step for a chunk of records: the blocks of every
    correctly signed `BlocksShipped` of the chunk are decoded, verified against their SHA-256
    (in a thread: it overlaps the transactions of the previous chunk) and, for an item whose
    blocks this service keeps, written to the replica store in one `put_blocks` per item (one
    pack append and fdatasync), before the records are
    handled (`on_blocks_shipped`, `on_blocks_shipped_run`). Writing verified,
    content-addressed blocks early is what `on_blocks_shipped` does first anyway (idempotent;
    unreferenced blocks are garbage-collected); `on_blocks_shipped` then finds them in
    `ctx.prestored` and skips decoding and writing. Anything unexpected
    (bad signature, unknown item, undecodable data, a hash mismatch) just leaves the record to
    `on_blocks_shipped`, which handles it as always."""

    verify = signature_verifier()

    async def prepare(group: list[tuple[Any, EventPayload]]) -> None:
        batches = [(env, msg) for env, msg in group if isinstance(msg, ev.BlocksShipped)]
        if not batches:
            return
        by_item: dict[tuple[uuid.UUID, str], list[tuple[Any, dict[int, tuple[str, bytes]]]]] = {}
        items: dict[uuid.UUID, dict[str, Any] | None] = {}
        # the geometry a batch is decoded to: its cycle's start in this chunk, else the open
        # cycle (on_blocks_shipped checks the bytes against the cycle it finds)
        cycles: dict[tuple[uuid.UUID, int], dict[str, Any] | None] = {
            (msg.item_id, msg.cycle_seq): {"disks": [d.model_dump() for d in msg.disks]}
            for _, msg in group
            if isinstance(msg, ev.CycleStarted)
        }
        token = RUN_MEMO.set({})  # each producer looked up once for the chunk
        try:
            async with ctx.pool.acquire() as conn:
                for env, msg in batches:
                    try:
                        await verify(conn, env, True)
                    except Rejected:
                        continue
                    if msg.item_id not in items:
                        items[msg.item_id] = await repo.get_item(conn, msg.item_id)
                    item = items[msg.item_id]
                    if item is None or str(item["source_agent_id"]) != env.producer_id:
                        continue
                    if (msg.item_id, msg.cycle_seq) not in cycles:
                        cycles[msg.item_id, msg.cycle_seq] = await repo.open_cycle(
                            conn, msg.item_id, msg.cycle_seq
                        )
                    cycle = cycles[msg.item_id, msg.cycle_seq]
                    disk = next(
                        (d for d in (cycle or {}).get("disks", []) if d["disk_id"] == msg.disk_id),
                        None,
                    )
                    if disk is None or disk["block_size"] > ctx.settings.max_block_bytes:
                        continue
                    try:
                        blocks = {
                            b.index: (b.sha256, data)
                            for b in msg.blocks
                            if b.data is not None
                            and (data := block_bytes(b, disk, msg.compression)) is not None
                        }
                    except ValueError:
                        continue
                    by_item.setdefault((msg.item_id, item["target_site"]), []).append((env, blocks))
        finally:
            RUN_MEMO.reset(token)

        def write(item_id: uuid.UUID, site: str, records: list[Any]) -> None:
            todo = [(i, sha, data) for _, bl in records for i, (sha, data) in bl.items()]
            ctx.put_blocks(site, item_id, agents[item_id], todo)

        agents = {i: (row or {}).get("recovery_agent_id") for i, row in items.items()}
        for (item_id, site), records in by_item.items():
            try:
                await asyncio.to_thread(write, item_id, site, records)
            except ValueError:  # a hash mismatch: on_blocks_shipped finds which and handles it
                continue
            for env, blocks in records:
                ctx.prestored[env.event_id] = (
                    site,
                    {i: data for i, (_, data) in blocks.items()},
                )

    return prepare


def block_bytes(
    block: ev.Block,
    disk: dict[str, Any],
    compression: ev.Compression,
    ready: bytes | None = None,
) -> bytes | None:
    """The block's bytes, or None for an all-zero block (never stored); ValueError says what
    is wrong. `ready`: the bytes already decoded (and verified) by the delta `prepare` step."""
    size, block_size = disk["size_bytes"], disk["block_size"]
    if block.index >= block_count(size, block_size):
        raise ValueError(f"outside a disk of {block_count(size, block_size)} blocks")
    if block.data is None:
        zero = zero_block_hash(block_length(block.index, size, block_size)).hex()
        if block.sha256 != zero:
            raise ValueError("marked zero but its SHA-256 is not that of a zero block")
        return None
    length = block_length(block.index, size, block_size)
    if ready is not None:
        if len(ready) != length:
            raise ValueError(f"{len(ready)} bytes where the block has {length}")
        return ready
    return decode_data(block, compression, length)

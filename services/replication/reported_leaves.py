"""Leaf hashes a recovery host reports of its replica (`ReplicaLeavesReported`, in chunks, all
before its answer): kept in `seed_leaves` under the request id until the answer, then taken and
put together disk by disk. Used by seeding (services/replication/seeding.py) and by a replica's
catch-up (services/replication/catch_up.py)."""

from __future__ import annotations

import base64
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from shared.kafka.decode import Rejected
from shared.merkle import HASH_SIZE, block_count
from shared.schemas import agent as cmd


async def keep(
    conn: asyncpg.Connection, request_id: uuid.UUID, msg: cmd.ReplicaLeavesReported
) -> None:
    """Keep one report until the answer (a repeated report changes nothing)."""
    try:
        hashes = base64.b64decode(msg.leaf_hashes, validate=True)
    except ValueError:
        raise Rejected("invalid_payload", "leaf_hashes is not base64") from None
    if len(hashes) % HASH_SIZE:
        raise Rejected("invalid_payload", f"leaf_hashes is not whole {HASH_SIZE}-byte digests")
    await conn.execute(
        "INSERT INTO seed_leaves (request_id, disk_id, chunk_no, item_id, chunks, first_index,"
        " size_bytes, block_size, leaves) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
        " ON CONFLICT DO NOTHING",
        request_id,
        msg.disk_id,
        msg.chunk_no,
        msg.item_id,
        msg.chunks,
        msg.first_index,
        msg.size_bytes,
        msg.block_size,
        hashes,
    )


async def take(conn: asyncpg.Connection, request_id: uuid.UUID) -> list[asyncpg.Record]:
    """The request's reports, no longer kept."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "DELETE FROM seed_leaves WHERE request_id = $1"
        " RETURNING disk_id, chunk_no, chunks, first_index, size_bytes, block_size, leaves",
        request_id,
    )
    return rows


def assembled(
    rows: Sequence[Mapping[str, Any]], disk_ids: list[str]
) -> tuple[dict[str, tuple[int, int, bytes]], str | None]:
    """Each disk's (size, block size, leaves) from the reported chunks, or what is missing."""
    by_disk: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_disk[r["disk_id"]].append(r)
    out: dict[str, tuple[int, int, bytes]] = {}
    for disk_id in disk_ids:
        chunks = sorted(by_disk.get(disk_id, []), key=lambda r: r["chunk_no"])
        if not chunks or [r["chunk_no"] for r in chunks] != list(range(chunks[0]["chunks"])):
            return {}, f"disk {disk_id}: not every chunk of its leaf hashes arrived"
        size, bs = chunks[0]["size_bytes"], chunks[0]["block_size"]
        expected = 0
        for r in chunks:
            if r["first_index"] != expected:
                return {}, f"disk {disk_id}: its leaf hashes do not follow on"
            expected += len(r["leaves"]) // HASH_SIZE
        if expected != block_count(size, bs):
            return {}, f"disk {disk_id}: {expected} leaf hashes for {block_count(size, bs)} blocks"
        out[disk_id] = (size, bs, b"".join(bytes(r["leaves"]) for r in chunks))
    return out, None

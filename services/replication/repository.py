"""Queries on the replication service's own schema: protected items, cycles and their staged
batches, recovery points, statistics and fault notes. Read models: `read_model_repository`;
the failover service's requests: `request_repository`."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from services.replication import domain
from services.replication.item import ItemDisk, ProtectedItem
from shared.schemas.replication import Health, ItemState

ITEM_COLUMNS = """item_id, vault_id, vm_id, vm_name, pairing_id, policy_id, source_agent_id,
 source_site, target_site, target_cloud_id, disks, copy_interval_seconds, state, health,
 health_reasons, error, paused, last_committed_seq, resync_seq, resync_id,
 last_point_source_time, last_cycle_at, initial_done_at, initial_progress, protected_since,
 active, created_at, updated_at, resync_attempts, resync_not_before, recovery_agent_id,
 replica_seq, replica_error, replica_follows, replica_catchup_id"""


async def record_replica_point(
    conn: asyncpg.Connection, item_id: uuid.UUID, seq: int, roots: dict[str, str]
) -> bool:
    """Record the roots the recovery host holds for point `seq`; True when they are the
    source's (the point's roots)."""
    matched: bool | None = await conn.fetchval(
        "UPDATE recovery_points SET replica_roots = $3 WHERE item_id = $1 AND cycle_seq = $2"
        " RETURNING (SELECT jsonb_object_agg(d->>'disk_id', d->>'merkle_root')"
        " FROM jsonb_array_elements(disks) d) = $3::jsonb",
        item_id,
        seq,
        roots,
    )
    return bool(matched)


async def lock_item_points(conn: asyncpg.Connection, item_id: uuid.UUID) -> None:
    """Until the transaction ends: a retention pass decides and prunes the item's points, or a
    materialise request chooses (and pins) one of them; never both at once, in any instance."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"points:{item_id}")


async def oldest_live_point(conn: asyncpg.Connection, item_id: uuid.UUID) -> int | None:
    seq: int | None = await conn.fetchval(
        "SELECT min(cycle_seq) FROM recovery_points WHERE item_id = $1 AND pruned_at IS NULL",
        item_id,
    )
    return seq


async def insert_item(conn: asyncpg.Connection, **fields: Any) -> dict[str, Any]:
    columns = ", ".join(fields)
    params = ", ".join(f"${i}" for i in range(1, len(fields) + 1))
    row = await conn.fetchrow(
        f"INSERT INTO protected_items ({columns}) VALUES ({params}) RETURNING {ITEM_COLUMNS}",
        *fields.values(),
    )
    await conn.execute("INSERT INTO item_stats (item_id) VALUES ($1)", fields["item_id"])
    return dict(row)


async def get_item(
    conn: asyncpg.Connection, item_id: uuid.UUID, *, lock: bool = False
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {ITEM_COLUMNS} FROM protected_items WHERE item_id = $1"
        + (" FOR UPDATE" if lock else ""),
        item_id,
    )
    return dict(row) if row else None


async def load_item(
    conn: asyncpg.Connection, item_id: uuid.UUID, *, lock: bool = True
) -> ProtectedItem | None:
    """The protected item as its aggregate (locked until the transaction ends, by default)."""
    row = await get_item(conn, item_id, lock=lock)
    return item_from_row(row) if row is not None else None


def item_from_row(row: dict[str, Any]) -> ProtectedItem:
    values = {name: row[name] for name in ITEM_FIELDS}
    values.update(
        state=ItemState(row["state"]),
        health=Health(row["health"]),
        disks=[
            ItemDisk(disk_id=d["disk_id"], size_bytes=d["size_bytes"], path=d.get("path", ""))
            for d in row["disks"]
        ],
        resync_attempts=row["resync_attempts"] or 0,
    )
    return ProtectedItem(**values)


ITEM_FIELDS = [name.strip() for name in ITEM_COLUMNS.split(",")]


async def save_item(conn: asyncpg.Connection, item: ProtectedItem) -> None:
    """One UPDATE of the columns the item changed since it was loaded (none: nothing)."""
    changed = item.changed_fields()
    if changed:
        await update_item(conn, item.item_id, **changed)
    item.changed.clear()


async def active_item_for_vm(
    conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {ITEM_COLUMNS} FROM protected_items WHERE vault_id = $1 AND vm_id = $2 AND active",
        vault_id,
        vm_id,
    )
    return dict(row) if row else None


async def list_items(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    state: str | None,
    health: str | None,
    limit: int,
    offset: int,
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {ITEM_COLUMNS} FROM protected_items WHERE vault_id = $1 AND active"
        " AND ($2::text IS NULL OR state = $2) AND ($3::text IS NULL OR health = $3)"
        " ORDER BY vm_name LIMIT $4 OFFSET $5",
        vault_id,
        state,
        health,
        limit,
        offset,
    )
    return [dict(r) for r in rows]


async def active_items(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(f"SELECT {ITEM_COLUMNS} FROM protected_items WHERE active")
    return [dict(r) for r in rows]


async def set_copy_interval(conn: asyncpg.Connection, policy_id: uuid.UUID, seconds: int) -> None:
    """A policy's new copy interval on every active item it protects."""
    await conn.execute(
        "UPDATE protected_items SET copy_interval_seconds = $2, updated_at = now()"
        " WHERE policy_id = $1 AND active",
        policy_id,
        seconds,
    )


async def update_item(conn: asyncpg.Connection, item_id: uuid.UUID, **fields: Any) -> None:
    sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
    await conn.execute(
        f"UPDATE protected_items SET {sets}, updated_at = now() WHERE item_id = $1",
        item_id,
        *fields.values(),
    )


async def open_cycle(
    conn: asyncpg.Connection, item_id: uuid.UUID, seq: int
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT item_id, cycle_seq, kind, disks, source_time, app_consistent, poisoned,"
        " delta_partition, first_offset FROM open_cycles WHERE item_id = $1 AND cycle_seq = $2",
        item_id,
        seq,
    )
    return dict(row) if row else None


async def unfinished_cycle(conn: asyncpg.Connection, item_id: uuid.UUID) -> int | None:
    """The latest cycle of the item that started and never completed (not poisoned)."""
    seq = await conn.fetchval(
        "SELECT max(cycle_seq) FROM open_cycles WHERE item_id = $1 AND poisoned IS NULL",
        item_id,
    )
    return int(seq) if seq is not None else None


async def start_cycle(
    conn: asyncpg.Connection,
    item_id: uuid.UUID,
    seq: int,
    kind: str,
    disks: list[dict[str, Any]],
    source_time: datetime,
    app_consistent: bool,
    delta_at: tuple[int, int] | None = None,
) -> None:
    """`delta_at`: (partition, offset) of the cycle's start on the delta topic (None: not
    from Kafka)."""
    partition, offset = delta_at or (None, None)
    await conn.execute(
        "INSERT INTO open_cycles (item_id, cycle_seq, kind, disks, source_time, app_consistent,"
        " delta_partition, first_offset) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT DO NOTHING",
        item_id,
        seq,
        kind,
        disks,
        source_time,
        app_consistent,
        partition,
        offset,
    )


async def poison_cycle(conn: asyncpg.Connection, item_id: uuid.UUID, seq: int, why: str) -> None:
    await conn.execute(
        "UPDATE open_cycles SET poisoned = $3 WHERE item_id = $1 AND cycle_seq = $2",
        item_id,
        seq,
        why,
    )


async def stage_batches(
    conn: asyncpg.Connection,
    item_id: uuid.UUID,
    seq: int,
    batches: list[tuple[int, str, list[tuple[int, str]], int]],
) -> None:
    """Stage batches (batch_no, disk_id, [(block index, sha256)], bytes) of one cycle, as if
    one after the other: a batch number already staged is kept, a block staged again takes
    the later hash. Two statements whatever the number of batches."""
    await conn.execute(
        "INSERT INTO staged_batches (item_id, cycle_seq, batch_no, blocks, bytes)"
        " SELECT $1, $2, b, n, s FROM unnest($3::int[], $4::int[], $5::bigint[]) AS t(b, n, s)"
        " ON CONFLICT DO NOTHING",
        item_id,
        seq,
        [b[0] for b in batches],
        [len(b[2]) for b in batches],
        [b[3] for b in batches],
    )
    latest = {(disk, index): digest for _, disk, blocks, _ in batches for index, digest in blocks}
    await conn.execute(
        "INSERT INTO staged_blocks (item_id, cycle_seq, disk_id, block_index, sha256)"
        " SELECT $1, $2, d, i, h FROM unnest($3::text[], $4::int[], $5::text[]) AS t(d, i, h)"
        " ON CONFLICT (item_id, cycle_seq, disk_id, block_index)"
        " DO UPDATE SET sha256 = EXCLUDED.sha256",
        item_id,
        seq,
        [disk for disk, _ in latest],
        [index for _, index in latest],
        list(latest.values()),
    )


async def staged_totals(
    conn: asyncpg.Connection, item_id: uuid.UUID, seq: int
) -> tuple[int, int, int]:
    row = await conn.fetchrow(
        "SELECT count(*) AS batches, coalesce(sum(blocks), 0) AS blocks,"
        " coalesce(sum(bytes), 0) AS bytes FROM staged_batches"
        " WHERE item_id = $1 AND cycle_seq = $2",
        item_id,
        seq,
    )
    return int(row["batches"]), int(row["blocks"]), int(row["bytes"])


async def staged_blocks(
    conn: asyncpg.Connection, item_id: uuid.UUID, seq: int
) -> dict[str, dict[int, str]]:
    rows = await conn.fetch(
        "SELECT disk_id, block_index, sha256 FROM staged_blocks"
        " WHERE item_id = $1 AND cycle_seq = $2",
        item_id,
        seq,
    )
    out: dict[str, dict[int, str]] = {}
    for r in rows:
        out.setdefault(r["disk_id"], {})[r["block_index"]] = r["sha256"]
    return out


async def drop_cycles(
    conn: asyncpg.Connection, item_id: uuid.UUID, upto: int | None = None
) -> None:
    """Forget staged cycles of an item (all, or those numbered <= `upto`)."""
    for table in ("open_cycles", "staged_batches", "staged_blocks"):
        await conn.execute(
            f"DELETE FROM {table} WHERE item_id = $1 AND ($2::int IS NULL OR cycle_seq <= $2)",
            item_id,
            upto,
        )


async def insert_point(conn: asyncpg.Connection, **fields: Any) -> None:
    columns = ", ".join(fields)
    params = ", ".join(f"${i}" for i in range(1, len(fields) + 1))
    await conn.execute(
        f"INSERT INTO recovery_points ({columns}) VALUES ({params}) ON CONFLICT DO NOTHING",
        *fields.values(),
    )


async def live_points(conn: asyncpg.Connection, item_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT item_id, cycle_seq, kind, point_type, source_time, committed_at, disks,"
        " changed_blocks, bytes FROM recovery_points WHERE item_id = $1 AND pruned_at IS NULL"
        " ORDER BY cycle_seq DESC",
        item_id,
    )
    return [dict(r) for r in rows]


async def mark_pruned(conn: asyncpg.Connection, item_id: uuid.UUID, seqs: list[int]) -> None:
    await conn.execute(
        "UPDATE recovery_points SET pruned_at = now() WHERE item_id = $1"
        " AND cycle_seq = ANY($2::int[]) AND pruned_at IS NULL",
        item_id,
        seqs,
    )


async def points_since(conn: asyncpg.Connection, item_id: uuid.UUID, since: datetime) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM recovery_points WHERE item_id = $1 AND committed_at >= $2",
            item_id,
            since,
        )
    )


async def record_cycle_stats(
    conn: asyncpg.Connection, item_id: uuid.UUID, ok: bool, latency: float, nbytes: int
) -> None:
    if ok:
        await conn.execute(
            "UPDATE item_stats SET cycles_ok = cycles_ok + 1,"
            " latency_sum_seconds = latency_sum_seconds + $2,"
            " latency_max_seconds = greatest(latency_max_seconds, $2),"
            " bytes_sum = bytes_sum + $3, bytes_max = greatest(bytes_max, $3) WHERE item_id = $1",
            item_id,
            latency,
            nbytes,
        )
    else:
        await conn.execute(
            "UPDATE item_stats SET cycles_failed = cycles_failed + 1 WHERE item_id = $1", item_id
        )


async def bump_stat(conn: asyncpg.Connection, item_id: uuid.UUID, column: str) -> None:
    assert column in ("network_failures", "app_consistency_failures")
    await conn.execute(f"UPDATE item_stats SET {column} = {column} + 1 WHERE item_id = $1", item_id)


async def item_stats(conn: asyncpg.Connection, item_id: uuid.UUID) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM item_stats WHERE item_id = $1", item_id)
    return dict(row) if row else {}


async def resyncs_due(conn: asyncpg.Connection) -> list[uuid.UUID]:
    rows = await conn.fetch(
        "SELECT item_id FROM protected_items WHERE active AND state = 'waiting_to_start_resync'"
        " AND resync_not_before IS NOT NULL AND resync_not_before <= now()"
    )
    return [r["item_id"] for r in rows]


async def note_storage_fault(conn: asyncpg.Connection, item_id: uuid.UUID, fault: str) -> bool:
    """Note why the item's cycles cannot be stored; True when none was noted before."""
    before = await conn.fetchval(
        "WITH before AS (SELECT storage_fault FROM item_fault_notes WHERE item_id = $1)"
        " INSERT INTO item_fault_notes (item_id, storage_fault) VALUES ($1, $2)"
        " ON CONFLICT (item_id) DO UPDATE SET storage_fault = $2, noted_at = now()"
        " RETURNING (SELECT storage_fault FROM before)",
        item_id,
        fault,
    )
    return before is None


async def note_dead_letter(conn: asyncpg.Connection, item_id: uuid.UUID, why: str) -> None:
    await conn.execute(
        "INSERT INTO item_fault_notes (item_id, dead_letter) VALUES ($1, $2)"
        " ON CONFLICT (item_id) DO UPDATE SET dead_letter = $2, noted_at = now()",
        item_id,
        why,
    )


async def fault_notes(conn: asyncpg.Connection, item_id: uuid.UUID) -> domain.FaultNotes:
    row = await conn.fetchrow(
        "SELECT storage_fault, dead_letter FROM item_fault_notes WHERE item_id = $1", item_id
    )
    return domain.FaultNotes(**dict(row)) if row is not None else domain.FaultNotes()


async def clear_fault_notes(conn: asyncpg.Connection, item_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM item_fault_notes WHERE item_id = $1", item_id)

"""Items' failover state (the ItemFailover aggregate, saved with its events through the outbox),
reverse-replication links between an old and a new protected item, and the networks created for
test failovers."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from services.failover.domain.items import ItemFailoverState
from services.failover.item_failover import (
    CleanupNote,
    FailoverInfo,
    ItemFailover,
    TestFailover,
    stored_info,
)
from services.failover.repository import Conn, emit


async def view(conn: Conn, item_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM item_failover WHERE item_id = $1", item_id)
    return dict(row) if row else None


async def item_failover(conn: Conn, item_id: uuid.UUID, vault_id: uuid.UUID) -> ItemFailover:
    """The item's failover state (protected, nothing done yet, if there is no row)."""
    found = await failover_view(conn, item_id)
    return found if found is not None else ItemFailover(item_id=item_id, vault_id=vault_id)


async def failover_view(conn: Conn, item_id: uuid.UUID) -> ItemFailover | None:
    """The item's failover state as stored; None if nothing was done to the item yet."""
    row = await conn.fetchrow("SELECT * FROM item_failover WHERE item_id = $1", item_id)
    if row is None:
        return None
    return ItemFailover(
        item_id=row["item_id"],
        vault_id=row["vault_id"],
        state=ItemFailoverState(row["state"]),
        info=FailoverInfo.model_validate(row["info"]),
        test=TestFailover.model_validate(row["test"]) if row["test"] else None,
        notes=[CleanupNote.model_validate(n) for n in row["notes"]],
    )


async def save_item_failover(conn: Conn, item: ItemFailover) -> None:
    """Write the item's failover state and its events (outbox), in the caller's transaction
    (given a pool: in a transaction of its own)."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own, own.transaction():
            await save_item_failover(own, item)
        return
    await conn.execute(
        "INSERT INTO item_failover (item_id, vault_id, state, info, test, notes)"
        " VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (item_id) DO UPDATE SET state = EXCLUDED.state,"
        " info = EXCLUDED.info, test = EXCLUDED.test, notes = EXCLUDED.notes, updated_at = now()",
        item.item_id,
        item.vault_id,
        item.state.value,
        stored_info(item.info),
        item.test.model_dump(mode="json") if item.test else None,
        [n.model_dump(mode="json") for n in item.notes],
    )
    for event in item.events:
        await emit(conn, item.vault_id, event, str(item.item_id))
    item.events.clear()


async def tests_to_force_clean(
    conn: Conn, started_before: datetime, forced_by: str
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(vault, item) of test failovers started before the limit; an item whose forced cleanup
    (by `forced_by`) failed in the last hour is left out: an operator sees the failed job (and
    its alert) instead of a new failed job every sweep."""
    rows = await conn.fetch(
        "SELECT f.vault_id, f.item_id FROM item_failover f WHERE f.state = 'testing'"
        " AND f.test IS NOT NULL AND (f.test->>'started_at')::timestamptz < $1"
        " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.target = f.item_id::text"
        " AND j.created_by = $2 AND j.state = 'failed'"
        " AND j.ended_at > now() - interval '1 hour')",
        started_before,
        forced_by,
    )
    return [(r["vault_id"], r["item_id"]) for r in rows]


async def insert_link(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    old_item_id: uuid.UUID,
    new_item_id: uuid.UUID,
    *,
    vm_id: str,
    vm_name: str,
    source_agent_id: uuid.UUID,
    source_site: str,
    target_site: str,
    disks: list[dict[str, Any]],
    nics: list[dict[str, Any]],
) -> None:
    """Reverse replication: `new_item_id` protects the VM of `old_item_id` now."""
    await conn.execute(
        "INSERT INTO item_links (old_item_id, new_item_id, vault_id, vm_id, vm_name,"
        " source_agent_id, source_site, target_site, disks, nics)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) ON CONFLICT DO NOTHING",
        old_item_id,
        new_item_id,
        vault_id,
        vm_id,
        vm_name,
        source_agent_id,
        source_site,
        target_site,
        disks,
        nics,
    )


async def link_of(
    conn: Conn, *, old: uuid.UUID | None = None, new: uuid.UUID | None = None
) -> dict[str, Any] | None:
    if old is not None:
        row = await conn.fetchrow("SELECT * FROM item_links WHERE old_item_id = $1", old)
    else:
        row = await conn.fetchrow("SELECT * FROM item_links WHERE new_item_id = $1", new)
    return dict(row) if row else None


async def current_item(conn: Conn, item_id: uuid.UUID) -> uuid.UUID:
    """Follow reverse-replication links to the item that protects the VM now."""
    seen = {item_id}
    while True:
        nxt = await conn.fetchval(
            "SELECT new_item_id FROM item_links WHERE old_item_id = $1", item_id
        )
        if nxt is None or nxt in seen:
            return item_id
        seen.add(nxt)
        item_id = nxt


# ------------------------------------------------------------------ test networks


async def insert_test_network(
    conn: Conn,
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    network_id: str,
    site: str,
    name: str,
) -> None:
    await conn.execute(
        "INSERT INTO test_networks (network_id, vault_id, job_id, site, name)"
        " VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING",
        network_id,
        vault_id,
        job_id,
        site,
        name,
    )


async def open_test_networks(conn: Conn, job_ids: list[uuid.UUID]) -> list[str]:
    """Networks created for the test failovers `job_ids` and not deleted yet."""
    rows = await conn.fetch(
        "SELECT network_id FROM test_networks WHERE job_id = ANY($1::uuid[])"
        " AND deleted_at IS NULL",
        job_ids,
    )
    return [str(r["network_id"]) for r in rows]


async def delete_test_network(conn: Conn, network_id: str) -> None:
    await conn.execute(
        "UPDATE test_networks SET deleted_at = now() WHERE network_id = $1", network_id
    )

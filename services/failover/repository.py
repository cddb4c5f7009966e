"""asyncpg queries for the failover service's own schema: the outbox and the questions it
asked, the read models (items, VMs, networks, mappings, clouds, answers), the items' failover
view, reverse-replication links, test networks and recovery plans. The jobs and their tasks are
in services/failover/job_repository.py."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from services.failover.domain import (
    ItemFailoverState,
    ItemRow,
    NetworkMapping,
    PlanGroup,
    RecoveryPlan,
    RetainedPoints,
)
from services.failover.item_failover import (
    CleanupNote,
    FailoverInfo,
    ItemFailover,
    TestFailover,
    stored_info,
)
from shared import outbox
from shared.kafka.decode import Rejected
from shared.schemas.envelope import EventPayload

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

PRODUCER_ID = "service:failover"

Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool
R = TypeVar("R", bound="DataclassInstance")


REPLICATION = "service:replication"


async def emit(
    conn: asyncpg.Connection, vault_id: uuid.UUID, payload: EventPayload, key: str
) -> None:
    """Publish `payload` (through the outbox); a question (an agent's command, a request to
    the replication service) is recorded with whom it was asked of, in the same transaction."""
    question = _question(payload)
    if question is not None:
        await conn.execute(
            "INSERT INTO questions (request_id, vault_id, addressee) VALUES ($1,$2,$3)"
            " ON CONFLICT (request_id) DO NOTHING",
            question[0],
            vault_id,
            question[1],
        )
    await outbox.emit(conn, payload, vault_id=vault_id, key=key, producer_id=PRODUCER_ID)


def _question(payload: EventPayload) -> tuple[uuid.UUID, str] | None:
    command_id, agent_id = getattr(payload, "command_id", None), getattr(payload, "agent_id", None)
    if isinstance(command_id, uuid.UUID) and isinstance(agent_id, uuid.UUID):
        return command_id, str(agent_id)
    request_id = getattr(payload, "request_id", None)
    if isinstance(request_id, uuid.UUID):
        return request_id, REPLICATION
    return None


async def check_answerer(
    conn: asyncpg.Connection, request_id: uuid.UUID, vault_id: uuid.UUID, producer_id: str
) -> bool:
    """True if `request_id` is a question of ours and this answer comes from whom it was asked
    of, in its vault; False if it is not ours (nothing to do). Raises Rejected otherwise."""
    row = await conn.fetchrow(
        "SELECT vault_id, addressee FROM questions WHERE request_id = $1", request_id
    )
    if row is None:
        return False
    if row["vault_id"] != vault_id:
        raise Rejected("vault_mismatch", f"{request_id} was asked in another vault")
    if row["addressee"] is not None and row["addressee"] != producer_id:
        raise Rejected(
            "wrong_answerer",
            f"{request_id} was asked of {row['addressee']}, not {producer_id}",
        )
    return True


# ------------------------------------------------------------------ read models


async def upsert_item(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    *,
    vm_id: str,
    vm_name: str,
    source_cloud_id: str,
    target_cloud_id: str,
    pairing_id: uuid.UUID,
    source_agent_id: uuid.UUID,
) -> None:
    """A protected item (again): its source agent may change; an item of another vault is
    left alone."""
    await conn.execute(
        "INSERT INTO rm_items (item_id, vault_id, vm_id, vm_name, source_cloud_id,"
        " target_cloud_id, pairing_id, source_agent_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
        " ON CONFLICT (item_id) DO UPDATE SET source_agent_id = EXCLUDED.source_agent_id,"
        " active = true, updated_at = now() WHERE rm_items.vault_id = EXCLUDED.vault_id",
        item_id,
        vault_id,
        vm_id,
        vm_name,
        source_cloud_id,
        target_cloud_id,
        pairing_id,
        source_agent_id,
    )


async def deactivate_item(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID
) -> None:
    await conn.execute(
        "UPDATE rm_items SET active = false WHERE item_id = $1 AND vault_id = $2",
        item_id,
        vault_id,
    )


async def set_item_state(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID, state: str, health: str
) -> None:
    await conn.execute(
        "UPDATE rm_items SET state = $2, health = $3, updated_at = now()"
        " WHERE item_id = $1 AND vault_id = $4",
        item_id,
        state,
        health,
        vault_id,
    )


async def record_point(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    cycle_seq: int,
    source_time: datetime,
    app_consistent: bool,
) -> None:
    """A new recovery point: the item's latest (and latest app-consistent) move forward only."""
    await conn.execute(
        "UPDATE rm_items SET latest_source_time = CASE WHEN coalesce(latest_seq, 0) < $2"
        "  THEN $3 ELSE latest_source_time END,"
        " latest_seq = greatest(coalesce(latest_seq, 0), $2),"
        " latest_app_seq = CASE WHEN $4 THEN greatest(coalesce(latest_app_seq, 0), $2)"
        "  ELSE latest_app_seq END, updated_at = now() WHERE item_id = $1 AND vault_id = $5",
        item_id,
        cycle_seq,
        source_time,
        app_consistent,
        vault_id,
    )
    await conn.execute(
        "INSERT INTO rm_points (item_id, vault_id, cycle_seq, app_consistent, source_time)"
        " SELECT $1, $2, $3, $4, $5 WHERE EXISTS"
        "  (SELECT 1 FROM rm_items WHERE item_id = $1 AND vault_id = $2)"
        " ON CONFLICT (item_id, cycle_seq) DO NOTHING",
        item_id,
        vault_id,
        cycle_seq,
        app_consistent,
        source_time,
    )


async def prune_points(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID, cycle_seqs: list[int]
) -> None:
    """Retention removed these points: they leave the item's retained points."""
    await conn.execute(
        "DELETE FROM rm_points WHERE item_id = $1 AND vault_id = $2"
        " AND cycle_seq = ANY($3::bigint[])",
        item_id,
        vault_id,
        cycle_seqs,
    )


async def retained_points(conn: Conn, item_id: uuid.UUID) -> RetainedPoints:
    rows = await conn.fetch(
        "SELECT cycle_seq, app_consistent FROM rm_points WHERE item_id = $1", item_id
    )
    return RetainedPoints(
        seqs=frozenset(r["cycle_seq"] for r in rows),
        app_seqs=frozenset(r["cycle_seq"] for r in rows if r["app_consistent"]),
    )


async def remove_vm(conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str, site: str) -> None:
    await conn.execute(
        "UPDATE rm_vms SET removed = true WHERE vault_id = $1 AND vm_id = $2 AND site = $3",
        vault_id,
        vm_id,
        site,
    )


async def upsert_vm(
    conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str, site: str, vm: dict[str, Any]
) -> None:
    """A recovery VM keeps its source's id: the primary's record stays the one we use for the
    source disks and NICs; only an item's own source site may overwrite it."""
    await conn.execute(
        "INSERT INTO rm_vms (vm_id, vault_id, site, vm) VALUES ($1,$2,$3,$4)"
        " ON CONFLICT (vault_id, vm_id) DO UPDATE SET vm = EXCLUDED.vm, site = EXCLUDED.site,"
        " removed = false WHERE rm_vms.site = EXCLUDED.site OR rm_vms.removed",
        vm_id,
        vault_id,
        site,
        vm,
    )


async def remove_network(conn: asyncpg.Connection, vault_id: uuid.UUID, network_id: str) -> None:
    await conn.execute(
        "UPDATE rm_networks SET removed = true WHERE vault_id = $1 AND network_id = $2",
        vault_id,
        network_id,
    )


async def upsert_network(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    network_id: str,
    site: str,
    network: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO rm_networks (network_id, vault_id, site, network) VALUES ($1,$2,$3,$4)"
        " ON CONFLICT (vault_id, network_id) DO UPDATE SET network = EXCLUDED.network,"
        " site = EXCLUDED.site, removed = false",
        network_id,
        vault_id,
        site,
        network,
    )


async def upsert_cloud(
    conn: asyncpg.Connection, vault_id: uuid.UUID, cloud_id: str, site: str
) -> None:
    await conn.execute(
        "INSERT INTO rm_clouds (cloud_id, vault_id, site) VALUES ($1,$2,$3)"
        " ON CONFLICT (vault_id, cloud_id) DO UPDATE SET site = EXCLUDED.site",
        cloud_id,
        vault_id,
        site,
    )


async def upsert_mapping(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    mapping_id: uuid.UUID,
    source_network_id: str,
    target_network_id: str,
    removed: bool,
) -> None:
    await conn.execute(
        "INSERT INTO rm_mappings (mapping_id, vault_id, source_network_id, target_network_id,"
        " removed) VALUES ($1,$2,$3,$4,$5) ON CONFLICT (vault_id, mapping_id) DO UPDATE SET"
        " target_network_id = EXCLUDED.target_network_id, removed = EXCLUDED.removed",
        mapping_id,
        vault_id,
        source_network_id,
        target_network_id,
        removed,
    )


async def known_items(conn: Conn, vault_id: uuid.UUID, item_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Those of `item_ids` that are protected items of the vault."""
    rows = await conn.fetch(
        "SELECT item_id FROM rm_items WHERE vault_id = $1 AND item_id = ANY($2::uuid[])",
        vault_id,
        item_ids,
    )
    return {r["item_id"] for r in rows}


async def item(conn: Conn, item_id: uuid.UUID) -> ItemRow | None:
    row = await conn.fetchrow("SELECT * FROM rm_items WHERE item_id = $1", item_id)
    return from_record(ItemRow, row) if row else None


async def items(conn: Conn, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT i.*, f.state AS failover_state FROM rm_items i"
        " LEFT JOIN item_failover f ON f.item_id = i.item_id"
        " WHERE i.vault_id = $1 ORDER BY i.vm_name, i.item_id",
        vault_id,
    )
    return [dict(r) for r in rows]


async def vm(conn: Conn, vault_id: uuid.UUID, vm_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT * FROM rm_vms WHERE vault_id = $1 AND vm_id = $2", vault_id, vm_id
    )
    return dict(row) if row else None


async def networks(conn: Conn, vault_id: uuid.UUID) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT network_id, site, network FROM rm_networks WHERE vault_id = $1 AND NOT removed",
        vault_id,
    )
    return {r["network_id"]: dict(r) for r in rows}


async def mappings(conn: Conn, vault_id: uuid.UUID) -> list[NetworkMapping]:
    rows = await conn.fetch(
        "SELECT * FROM rm_mappings WHERE vault_id = $1 AND NOT removed", vault_id
    )
    return [from_record(NetworkMapping, r) for r in rows]


async def cloud_site(conn: Conn, vault_id: uuid.UUID, cloud_id: str) -> str | None:
    site: str | None = await conn.fetchval(
        "SELECT site FROM rm_clouds WHERE vault_id = $1 AND cloud_id = $2", vault_id, cloud_id
    )
    return site


async def producer(conn: Conn, producer_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM known_producers WHERE producer_id = $1", producer_id)
    return dict(row) if row else None


async def agents_at(conn: Conn, vault_id: uuid.UUID, site: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT * FROM known_producers WHERE vault_id = $1 AND site = $2 AND kind = 'agent'"
        " AND active ORDER BY (connection_state IS DISTINCT FROM 'Connected'), name",
        vault_id,
        site,
    )
    return [dict(r) for r in rows]


async def used_ips(conn: Conn, vault_id: uuid.UUID) -> set[str]:
    """Addresses held by discovered VMs and by recovery VMs this service placed."""
    used: set[str] = set()
    for r in await conn.fetch(
        "SELECT vm FROM rm_vms WHERE vault_id = $1 AND NOT removed", vault_id
    ):
        used.update(n["ip_address"] for n in r["vm"].get("nics", []) if n.get("ip_address"))
    for r in await conn.fetch("SELECT info FROM item_failover WHERE vault_id = $1", vault_id):
        used.update(n["ip_address"] for n in r["info"].get("nics", []) if n.get("ip_address"))
    return used


@dataclass(frozen=True)
class AnswerRow:
    """An agent's or the replication service's answer to a step's command or request, as it
    sent it."""

    request_id: uuid.UUID
    kind: str
    ok: bool
    error: str
    result: dict[str, object]
    at: datetime


def from_record(cls: type[R], row: asyncpg.Record) -> R:
    """The row as the dataclass `cls` (whose fields name the row's columns)."""
    return cls(**{f.name: row[f.name] for f in fields(cls)})


async def answer(conn: Conn, request_id: uuid.UUID) -> AnswerRow | None:
    row = await conn.fetchrow("SELECT * FROM answers WHERE request_id = $1", request_id)
    return from_record(AnswerRow, row) if row else None


async def save_answer(
    conn: asyncpg.Connection,
    request_id: uuid.UUID,
    kind: str,
    ok: bool,
    error: str,
    result: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO answers (request_id, kind, ok, error, result) VALUES ($1,$2,$3,$4,$5)"
        " ON CONFLICT (request_id) DO NOTHING",
        request_id,
        kind,
        ok,
        error,
        result,
    )


# ------------------------------------------------------------------ item failover view


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


# ------------------------------------------------------------------ plans


def _plan(row: asyncpg.Record) -> RecoveryPlan:
    return RecoveryPlan(
        plan_id=row["plan_id"],
        vault_id=row["vault_id"],
        name=row["name"],
        description=row["description"],
        groups=[PlanGroup.model_validate(g) for g in row["groups"]],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _groups(groups: list[PlanGroup]) -> list[dict[str, Any]]:
    return [g.model_dump(mode="json") for g in groups]


async def plan(conn: Conn, vault_id: uuid.UUID, plan_ref: str) -> RecoveryPlan | None:
    try:
        pid: uuid.UUID | None = uuid.UUID(plan_ref)
    except ValueError:
        pid = None
    row = await conn.fetchrow(
        "SELECT * FROM recovery_plans WHERE vault_id = $1 AND (plan_id = $2 OR name = $3)",
        vault_id,
        pid,
        plan_ref,
    )
    return _plan(row) if row else None


async def plans(conn: Conn, vault_id: uuid.UUID) -> list[RecoveryPlan]:
    rows = await conn.fetch(
        "SELECT * FROM recovery_plans WHERE vault_id = $1 ORDER BY name", vault_id
    )
    return [_plan(r) for r in rows]


async def insert_plan(
    conn: Conn,
    vault_id: uuid.UUID,
    name: str,
    description: str,
    groups: list[PlanGroup],
) -> RecoveryPlan | None:
    """The new plan; None if the vault has a plan of that name."""
    try:
        row = await conn.fetchrow(
            "INSERT INTO recovery_plans (plan_id, vault_id, name, description, groups)"
            " VALUES ($1,$2,$3,$4,$5) RETURNING *",
            uuid.uuid4(),
            vault_id,
            name,
            description,
            _groups(groups),
        )
    except asyncpg.UniqueViolationError:
        return None
    return _plan(row)


async def replace_plan(
    conn: Conn,
    plan_id: uuid.UUID,
    name: str,
    description: str,
    groups: list[PlanGroup],
) -> RecoveryPlan | None:
    """The plan replaced; None if another plan of the vault has that name."""
    try:
        row = await conn.fetchrow(
            "UPDATE recovery_plans SET name = $2, description = $3, groups = $4,"
            " updated_at = now() WHERE plan_id = $1 RETURNING *",
            plan_id,
            name,
            description,
            _groups(groups),
        )
    except asyncpg.UniqueViolationError:
        return None
    return _plan(row)


async def delete_idle_plan(conn: Conn, plan_id: uuid.UUID) -> bool:
    """Delete the plan unless a job of it is unfinished, in one statement (no window between
    the check and the delete); False if it was kept (or is gone)."""
    deleted = await conn.fetchval(
        "DELETE FROM recovery_plans WHERE plan_id = $1 AND NOT EXISTS (SELECT 1 FROM jobs"
        " WHERE target = $1::text AND state IN ('not_started', 'in_progress',"
        " 'waiting_for_input')) RETURNING plan_id",
        plan_id,
    )
    return deleted is not None

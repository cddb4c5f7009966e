"""Replication handlers: load, decide (domain), persist + outbox in one transaction.

The delta pipeline: `CycleStarted` opens a cycle, `BlocksShipped` batches are verified
(SHA-256 of every block) and their blocks written to the replica store (content-addressed,
idempotent) and staged in PostgreSQL; `CycleCompleted` commits a recovery point only if every
batch arrived and the replica's Merkle roots equal the source's. Anything else never yields a
point: the item goes to resync and the agent is told to resync (only differing blocks).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge, Histogram

from services.replication import domain
from services.replication import repository as repo
from services.replication.config import ReplicationSettings
from services.replication.retention import PointMeta, select_retained
from services.replication.store import (
    DiskPoint,
    MissingBlock,
    PointManifest,
    ReplicaStore,
    RootMismatch,
)
from shared import outbox, topics
from shared.delta_blocks import decode_data
from shared.faults import crash_point
from shared.kafka.consumers import RUN_MEMO, Handler, RunFallback, RunHandler
from shared.kafka.decode import Incoming, Rejected
from shared.merkle import block_count, block_length, zero_block_hash
from shared.metrics import reason_label
from shared.readmodels import NotYetKnown, signature_verifier
from shared.runtime import DependencyWatch
from shared.schemas import agent as cmd
from shared.schemas import replication as ev
from shared.schemas.envelope import EventPayload
from shared.schemas.replication import Health, ItemState

log = logging.getLogger(__name__)

PRODUCER_ID = "service:replication"
HASHES_PER_CHUNK = 16_384  # 512 KiB of digests -> ~700 KB base64 per resync command

BYTES_APPLIED = Counter("dr_replication_bytes_applied_total", "Changed-block bytes applied")
BLOCKS_APPLIED = Counter("dr_replication_blocks_applied_total", "Changed blocks applied")
CYCLES = Counter("dr_replication_cycles_total", "Delta cycles by result", ["result"])
APPLY_SECONDS = Histogram(
    "dr_replication_apply_latency_seconds",
    "Source capture to committed recovery point",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900),
)
RPO_SECONDS = Gauge("dr_replication_rpo_seconds", "RPO of a protected item", ["item_id", "vm"])
RPO_THRESHOLD = Gauge(
    "dr_replication_rpo_threshold_seconds",
    "RPO an item should stay under: twice its policy's copy interval, at least 30 s",
    ["item_id", "vm"],
)
ITEMS_BY_HEALTH = Gauge("dr_replication_items", "Protected items by health", ["health"])
STORE_BYTES = Gauge("dr_replica_store_bytes", "Bytes of pack files (blocks) in the replica store")
STORE_BYTES_EVERY = 30.0  # seconds between two walks of the replica store for STORE_BYTES
RESYNCS = Counter("dr_replication_resyncs_total", "Resyncs requested", ["reason"])


@dataclass
class Context:
    pool: asyncpg.Pool
    settings: ReplicationSettings
    stores: dict[str, ReplicaStore] = field(default_factory=dict)
    failover_wake: asyncio.Event = field(default_factory=asyncio.Event)  # a request to work on
    # BlocksShipped event id -> (site, index -> bytes) whose blocks `make_delta_prepare` already
    # verified and made durable in that site's store (the group being handled; then cleared)
    prestored: dict[uuid.UUID, tuple[str, dict[int, bytes]]] = field(default_factory=dict)
    store_bytes_at: float = float("-inf")  # when `dr_replica_store_bytes` was last measured
    delta_partitions: int | None = None  # of replication.deltas, to check records' partitions
    # this process's view of Kafka, named as the cause in late items' health
    broker: DependencyWatch | None = None

    @contextlib.asynccontextmanager
    async def storing(self, item_id: uuid.UUID) -> AsyncIterator[None]:
        """Around a replica-store write for `item_id`: a storage failure is noted for the
        item's health (and re-raised: the record is retried, nothing is skipped). The note
        is written on a connection of its own: the record's transaction rolls back."""
        try:
            yield
        except OSError as exc:
            fault = domain.storage_fault(exc)
            if fault is not None:
                async with self.pool.acquire() as conn:
                    if await repo.note_storage_fault(conn, item_id, fault):
                        log.error(
                            "replica storage failure",
                            extra={"item_id": str(item_id), "error": str(exc)},
                        )
            raise

    async def recovered(self, item_id: uuid.UUID) -> None:
        """A cycle of `item_id` was stored: what was noted about it no longer holds. On a
        connection of its own too, so that the record's transaction never holds the note's
        row while a later failure of it notes again."""
        async with self.pool.acquire() as conn:
            await repo.clear_fault_notes(conn, item_id)

    def store(self, site: str) -> ReplicaStore:
        if site not in self.stores:
            self.stores[site] = ReplicaStore(self.settings.store_dir / site)
        return self.stores[site]


async def emit(
    conn: asyncpg.Connection, vault_id: uuid.UUID, payload: EventPayload, key: str
) -> None:
    await outbox.emit(conn, payload, vault_id=vault_id, key=key, producer_id=PRODUCER_ID)


async def command(conn: asyncpg.Connection, item: dict[str, Any], payload: EventPayload) -> None:
    await emit(conn, item["vault_id"], payload, str(item["source_agent_id"]))


async def change_state(
    conn: asyncpg.Connection,
    item: dict[str, Any],
    state: ItemState,
    *,
    reason: str = "",
    health: Health | None = None,
    **fields: Any,
) -> None:
    previous = ItemState(item["state"])
    new_health = health or Health(item["health"])
    await repo.update_item(
        conn, item["item_id"], state=state.value, health=new_health.value, **fields
    )
    if previous is not state or Health(item["health"]) is not new_health:
        await emit(
            conn,
            item["vault_id"],
            ev.ItemStateChanged(
                item_id=item["item_id"],
                vm_id=item["vm_id"],
                state=state,
                previous_state=previous,
                health=new_health,
                reason=reason,
            ),
            str(item["item_id"]),
        )
    item.update(state=state.value, health=new_health.value, **fields)


# ------------------------------------------------------------------ resync


async def require_resync(
    ctx: Context, conn: asyncpg.Connection, item: dict[str, Any], reason: str
) -> None:
    """The replica can't take the next cycle: put the item in resync. The first time the
    agent is asked at once; a resync that fails again is retried after a backoff (docs/reference.md:
    1, 2, 4, 8, 10 min, then every 30 min)."""
    RESYNCS.labels(reason_label(reason)).inc()
    await repo.drop_cycles(conn, item["item_id"])
    retrying = ItemState(item["state"]) in (
        ItemState.RESYNCHRONIZING,
        ItemState.WAITING_TO_START_RESYNC,
    )
    attempts = (item["resync_attempts"] or 0) + 1 if retrying else 1
    delay = ctx.settings.resync_backoff(attempts - 1) if retrying else 0.0
    await change_state(
        conn,
        item,
        ItemState.WAITING_TO_START_RESYNC,
        reason=reason,
        health=Health.CRITICAL,
        error=reason,
        resync_attempts=attempts,
        resync_not_before=datetime.now(UTC) + timedelta(seconds=delay),
    )
    log.warning(
        "resync required",
        extra={
            "item_id": str(item["item_id"]),
            "reason": reason,
            "attempt": attempts,
            "delay_seconds": delay,
        },
    )
    if not retrying:
        await request_resync(ctx, conn, item)


async def request_resync(ctx: Context, conn: asyncpg.Connection, item: dict[str, Any]) -> None:
    """Ask the agent for the blocks whose hashes differ from the replica's latest point (the
    replica's leaf hashes travel in chunked commands); the resync cycle gets the next number."""
    seq = (item["last_committed_seq"] or 0) + 1
    resync_id = uuid.uuid4()
    store = ctx.store(item["target_site"])
    item_key = str(item["item_id"])
    has_point = item["last_committed_seq"] is not None
    disks = item["disks"]
    for disk in disks:
        hashes: list[bytes] = (
            await asyncio.to_thread(store.leaf_hashes, item_key, disk["disk_id"])
            if has_point
            else []
        )
        size = disk["size_bytes"] if has_point else 0
        chunks = max(1, -(-len(hashes) // HASHES_PER_CHUNK))
        for chunk_no in range(chunks):
            part = hashes[chunk_no * HASHES_PER_CHUNK : (chunk_no + 1) * HASHES_PER_CHUNK]
            await command(
                conn,
                item,
                cmd.ResyncRequested(
                    command_id=uuid.uuid5(resync_id, f"{disk['disk_id']}:{chunk_no}"),
                    agent_id=item["source_agent_id"],
                    item_id=item["item_id"],
                    resync_id=resync_id,
                    cycle_seq=seq,
                    disk_id=disk["disk_id"],
                    disk_count=len(disks),
                    size_bytes=size,
                    chunk_no=chunk_no,
                    chunks=chunks,
                    first_index=chunk_no * HASHES_PER_CHUNK,
                    leaf_hashes=base64.b64encode(b"".join(part)).decode(),
                ),
            )
    await change_state(
        conn,
        item,
        ItemState.RESYNCHRONIZING,
        reason=item["error"] or "resync requested",
        health=Health.CRITICAL,
        resync_seq=seq,
        resync_id=resync_id,
        resync_not_before=None,
    )


async def start_due_resyncs(ctx: Context) -> int:
    """Send the resync requests whose backoff has passed."""
    async with ctx.pool.acquire() as conn:
        due = await repo.resyncs_due(conn)
    for item_id in due:
        async with ctx.pool.acquire() as conn, conn.transaction():
            item = await repo.get_item(conn, item_id, lock=True)
            if item is not None and item["state"] == ItemState.WAITING_TO_START_RESYNC.value:
                await request_resync(ctx, conn, item)
    return len(due)


# ------------------------------------------------------------------ the delta pipeline


async def _item_for(conn: asyncpg.Connection, inc: Incoming, item_id: uuid.UUID) -> dict[str, Any]:
    item = await repo.get_item(conn, item_id, lock=True)
    _check_source(item, inc, item_id)
    assert item is not None
    return item


async def _item_and_cycle(
    conn: asyncpg.Connection, inc: Incoming, item_id: uuid.UUID, seq: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The item (locked, checked against the sender) and its open cycle `seq`, None if there
    is none or it was given up on (poisoned)."""
    item = await _item_for(conn, inc, item_id)
    cycle = await repo.open_cycle(conn, item_id, seq)
    return item, None if cycle is None or cycle["poisoned"] else cycle


def _check_source(item: dict[str, Any] | None, inc: Incoming, item_id: uuid.UUID) -> None:
    if item is None or not item["active"]:
        raise Rejected("unknown_item", f"no active protected item {item_id}")
    if item["vault_id"] != inc.envelope.vault_id:
        raise Rejected("vault_mismatch", "the item belongs to another vault")
    if str(item["source_agent_id"]) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", "only the item's source agent may ship its cycles")


def make_delta_handlers(ctx: Context) -> tuple[dict[str, Any], dict[str, RunHandler]]:
    """(handlers by event type, run handlers by event type) of the delta pipeline."""

    async def on_started(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, ev.CycleStarted)
        item = await _item_for(conn, inc, msg.item_id)
        problem = domain.geometry_problem(
            item["disks"],
            [d.model_dump() for d in msg.disks],
            ctx.settings.max_disk_bytes,
            ctx.settings.max_block_bytes,
        )
        if problem is not None:
            raise Rejected(*problem)
        verdict = domain.judge_cycle_start(
            ItemState(item["state"]),
            item["last_committed_seq"],
            item["resync_seq"],
            msg.cycle_seq,
            msg.kind,
            await repo.unfinished_cycle(conn, msg.item_id),
        )
        if verdict is domain.CycleVerdict.REPLAY:
            CYCLES.labels("replayed").inc()
            raise Rejected(
                "replayed_cycle",
                f"cycle {msg.cycle_seq} <= last committed {item['last_committed_seq']}",
            )
        if verdict is domain.CycleVerdict.IGNORE:
            CYCLES.labels("ignored").inc()
            log.info(
                "cycle ignored",
                extra={"item_id": str(msg.item_id), "seq": msg.cycle_seq, "state": item["state"]},
            )
            return
        if verdict is domain.CycleVerdict.GAP:
            CYCLES.labels("gap").inc()
            expected = (item["last_committed_seq"] or 0) + 1
            why = (await repo.fault_notes(conn, msg.item_id)).dead_letter
            await require_resync(
                ctx,
                conn,
                item,
                f"sequence gap: expected cycle {expected}, got {msg.cycle_seq}"
                + (f" (after {why})" if why else ""),
            )
            return
        await repo.drop_cycles(conn, msg.item_id)  # an unfinished earlier attempt, if any
        await repo.start_cycle(
            conn,
            msg.item_id,
            msg.cycle_seq,
            msg.kind.value,
            [d.model_dump() for d in msg.disks],
            msg.source_time,
            msg.app_consistent,
            # where the recovery host starts reading the cycle (files imported: no offsets)
            inc.partition if inc.partition >= 0 else None,
            inc.offset if inc.partition >= 0 else None,
        )
        if ItemState(item["state"]) is ItemState.WAITING_FOR_INITIAL:
            await change_state(conn, item, ItemState.INITIAL_REPLICATION, reason="initial cycle")

    async def stored_blocks(
        item: dict[str, Any], cycle: dict[str, Any], inc: Incoming
    ) -> tuple[list[tuple[int, str]], int, tuple[str, str] | None]:
        """One batch's blocks checked against the cycle's disks and their hashes, and durable
        in the store: ((index, sha256) of each, bytes stored, None) or, for a bad block,
        (.., .., (reason, what is wrong with it))."""
        msg = inc.payload
        assert isinstance(msg, ev.BlocksShipped)
        geometry = {d["disk_id"]: d for d in cycle["disks"]}
        if msg.disk_id not in geometry:
            raise Rejected("unknown_disk", f"disk {msg.disk_id} is not in cycle {msg.cycle_seq}")
        disk = geometry[msg.disk_id]
        site, ready = ctx.prestored.get(inc.envelope.event_id, ("", {}))
        if site != item["target_site"]:
            ready = {}
        decoded: list[tuple[int | None, str, bytes]] = []
        staged: list[tuple[int, str]] = []
        for block in msg.blocks:
            try:
                data = _block_bytes(block, disk, msg.compression, ready.get(block.index))
            except ValueError as exc:
                return staged, 0, ("bad_block", f"block {block.index}: {exc}")
            staged.append((block.index, block.sha256))
            if data is not None:
                decoded.append((block.index, block.sha256, data))
        if not (ready and len(ready) == len(decoded)):
            store = ctx.store(item["target_site"])
            try:
                async with ctx.storing(msg.item_id):
                    await asyncio.to_thread(store.put_blocks, str(msg.item_id), decoded)
            except ValueError as exc:  # BlockHashMismatch
                return staged, 0, ("block_hash_mismatch", str(exc))
        return staged, sum(len(data) for _, _, data in decoded), None

    async def on_blocks(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, ev.BlocksShipped)
        item, cycle = await _item_and_cycle(conn, inc, msg.item_id, msg.cycle_seq)
        if cycle is None:
            CYCLES.labels("orphan_batch").inc()
            return  # a batch of a cycle we ignore or already gave up on
        staged, nbytes, why = await stored_blocks(item, cycle, inc)
        if why is not None:
            reason, text = why
            await repo.poison_cycle(conn, msg.item_id, msg.cycle_seq, text)
            await require_resync(ctx, conn, item, f"bad block in cycle {msg.cycle_seq}: {text}")
            raise Rejected(reason, text, keep_effects=True)
        crash_point("replication.blocks_stored")
        await repo.stage_batches(
            conn, msg.item_id, msg.cycle_seq, [(msg.batch_no, msg.disk_id, staged, nbytes)]
        )
        BYTES_APPLIED.inc(nbytes)
        BLOCKS_APPLIED.inc(len(staged))

    async def on_blocks_run(conn: asyncpg.Connection, incs: list[Incoming]) -> None:
        """`on_blocks` of consecutive batches of one cycle in one transaction: the item, the
        cycle and the producer looked up once, the batches staged in two statements. Any
        batch that is not plain sailing sends the run back to `on_blocks`, batch by batch."""
        first = incs[0].payload
        assert isinstance(first, ev.BlocksShipped)
        msgs = [inc.payload for inc in incs]
        if any(
            not isinstance(m, ev.BlocksShipped)
            or (m.item_id, m.cycle_seq) != (first.item_id, first.cycle_seq)
            for m in msgs
        ):
            raise RunFallback("batches of more than one cycle")
        item, cycle = await _item_and_cycle(conn, incs[0], first.item_id, first.cycle_seq)
        for inc in incs[1:]:
            _check_source(item, inc, first.item_id)
        if cycle is None:
            CYCLES.labels("orphan_batch").inc(len(incs))
            return
        batches: list[tuple[int, str, list[tuple[int, str]], int]] = []
        for inc, msg in zip(incs, msgs, strict=True):
            assert isinstance(msg, ev.BlocksShipped)
            staged, nbytes, why = await stored_blocks(item, cycle, inc)
            if why is not None:
                raise RunFallback(why[1])
            batches.append((msg.batch_no, msg.disk_id, staged, nbytes))
        crash_point("replication.blocks_stored")
        await repo.stage_batches(conn, first.item_id, first.cycle_seq, batches)
        BYTES_APPLIED.inc(sum(b[3] for b in batches))
        BLOCKS_APPLIED.inc(sum(len(b[2]) for b in batches))

    async def on_completed(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, ev.CycleCompleted)
        item, cycle = await _item_and_cycle(conn, inc, msg.item_id, msg.cycle_seq)
        if cycle is None:
            return
        batches, blocks, nbytes = await repo.staged_totals(conn, msg.item_id, msg.cycle_seq)
        truncated = domain.incomplete_reason(msg.batches, msg.blocks, batches, blocks)
        if truncated:
            CYCLES.labels("truncated").inc()
            await repo.record_cycle_stats(conn, msg.item_id, False, 0, 0)
            await require_resync(ctx, conn, item, f"cycle {msg.cycle_seq}: {truncated}")
            return
        changed = await repo.staged_blocks(conn, msg.item_id, msg.cycle_seq)
        geometry = {d["disk_id"]: d for d in cycle["disks"]}
        manifest = PointManifest(
            seq=msg.cycle_seq,
            kind=msg.kind.value,
            source_time=msg.source_time,
            app_consistent=msg.app_consistent,
            disks=[
                DiskPoint(
                    disk_id=root.disk_id,
                    size_bytes=root.size_bytes,
                    block_size=geometry.get(root.disk_id, {}).get("block_size", 65536),
                    merkle_root=root.merkle_root,
                    changed=changed.get(root.disk_id, {}),
                )
                for root in msg.disks
            ],
        )
        store = ctx.store(item["target_site"])
        try:
            async with ctx.storing(msg.item_id):
                await asyncio.to_thread(store.commit_point, str(msg.item_id), manifest)
            await ctx.recovered(msg.item_id)
        except (RootMismatch, MissingBlock) as exc:
            CYCLES.labels("root_mismatch").inc()
            await repo.record_cycle_stats(conn, msg.item_id, False, 0, 0)
            await require_resync(ctx, conn, item, f"cycle {msg.cycle_seq}: {exc}")
            return
        now = datetime.now(UTC)
        latency = (now - msg.source_time).total_seconds()
        point_type = (
            ev.RecoveryPointType.APP_CONSISTENT
            if msg.app_consistent
            else ev.RecoveryPointType.CRASH_CONSISTENT
        )
        changed_count = sum(len(c) for c in changed.values())
        await repo.insert_point(
            conn,
            item_id=msg.item_id,
            cycle_seq=msg.cycle_seq,
            kind=msg.kind.value,
            point_type=point_type.value,
            source_time=msg.source_time,
            disks=[d.model_dump() for d in msg.disks],
            changed_blocks=changed_count,
            bytes=nbytes,
        )
        await repo.drop_cycles(conn, msg.item_id, msg.cycle_seq)
        await repo.record_cycle_stats(conn, msg.item_id, True, latency, nbytes)
        fields: dict[str, Any] = {
            "last_committed_seq": msg.cycle_seq,
            "last_point_source_time": msg.source_time,
            "last_cycle_at": now,
            "error": None,
            "resync_seq": None,
            "resync_id": None,
            "resync_attempts": 0,
            "disks": [
                {**d, "size_bytes": geometry[d["disk_id"]]["size_bytes"]}
                if d["disk_id"] in geometry
                else d
                for d in item["disks"]
            ],
        }
        if item["initial_done_at"] is None:
            fields["initial_done_at"] = now
        # The point first, then the state it brings: a view never sees the item `replicating`
        # (e.g. past its resync) before the recovery point that made it so.
        await emit(
            conn,
            item["vault_id"],
            ev.RecoveryPointCreated(
                item_id=msg.item_id,
                vm_id=item["vm_id"],
                cycle_seq=msg.cycle_seq,
                kind=msg.kind,
                point_type=point_type,
                source_time=msg.source_time,
                disks=msg.disks,
                changed_blocks=changed_count,
                bytes_stored=nbytes,
            ),
            str(msg.item_id),
        )
        new_state = domain.state_after_point(ItemState(item["state"]), msg.kind)
        healthy = Health.NORMAL if Health(item["health"]) is Health.CRITICAL else None
        await change_state(
            conn,
            item,
            new_state,
            reason=f"recovery point {msg.cycle_seq}",
            health=healthy,
            **fields,
        )
        await feed_replica(conn, item, cycle, msg, inc)
        CYCLES.labels("committed").inc()
        APPLY_SECONDS.observe(latency)

    handlers = {
        "CycleStarted": on_started,
        "BlocksShipped": on_blocks,
        "CycleCompleted": on_completed,
    }
    return (
        {name: _delta_checked(ctx, handler) for name, handler in handlers.items()},
        {"BlocksShipped": _delta_run_checked(ctx, on_blocks_run)},
    )


async def feed_replica(
    conn: asyncpg.Connection,
    item: dict[str, Any],
    cycle: dict[str, Any],
    msg: ev.CycleCompleted,
    inc: Incoming,
) -> None:
    """Command the item's recovery host to apply the committed point from the cycle's own
    records on the delta topic (partition and offsets), in the commit's transaction."""
    if item["recovery_agent_id"] is None or cycle["delta_partition"] is None:
        return
    geometry = {d["disk_id"]: d for d in cycle["disks"]}
    await emit(
        conn,
        item["vault_id"],
        cmd.ReplicaPointApplyRequested(
            command_id=uuid.uuid5(msg.item_id, f"replica-apply:{msg.cycle_seq}"),
            agent_id=item["recovery_agent_id"],
            item_id=msg.item_id,
            cycle_seq=msg.cycle_seq,
            partition=cycle["delta_partition"],
            first_offset=cycle["first_offset"],
            last_offset=inc.offset,
            disks=[
                cmd.ReplicaDisk(
                    disk_id=d.disk_id,
                    size_bytes=d.size_bytes,
                    block_size=geometry.get(d.disk_id, {}).get("block_size", 65536),
                    merkle_root=d.merkle_root,
                )
                for d in msg.disks
            ],
            keep_from=await repo.oldest_live_point(conn, msg.item_id) or msg.cycle_seq,
        ),
        str(item["recovery_agent_id"]),
    )


async def drop_site_replica(conn: asyncpg.Connection, item: dict[str, Any]) -> None:
    """Command the item's recovery host to delete its replica (idempotent)."""
    if item["recovery_agent_id"] is None:
        return
    await emit(
        conn,
        item["vault_id"],
        cmd.ReplicaDeleteRequested(
            command_id=uuid.uuid5(item["item_id"], "replica-delete"),
            agent_id=item["recovery_agent_id"],
            item_id=item["item_id"],
        ),
        str(item["recovery_agent_id"]),
    )


def _check_partition(ctx: Context, inc: Incoming) -> None:
    """A delta record must be on the partition Kafka's default partitioner (murmur2) gives its
    key: one item's records on one partition is what keeps its cycles in order."""
    if ctx.delta_partitions is None or inc.key is None or inc.partition < 0:
        return  # not known yet, or not from Kafka (an imported cycle file)
    expected = topics.partition_for(inc.key.encode(), ctx.delta_partitions)
    if inc.partition != expected:
        raise Rejected(
            "wrong_partition",
            f"record keyed {inc.key} arrived on partition {inc.partition}, but Kafka's default "
            f"partitioner (murmur2) puts that key on partition {expected} of "
            f"{ctx.delta_partitions}: publish with a murmur2 partitioner (kcat: -X "
            "partitioner=murmur2_random), or per-item order is lost",
        )


async def _note_dead_letter(ctx: Context, inc: Incoming, rej: Rejected) -> None:
    """Note on the record's item why it was dead-lettered (its own connection: the record's
    transaction rolls back)."""
    item_id = getattr(inc.payload, "item_id", None)
    if isinstance(item_id, uuid.UUID) and rej.reason not in ("replayed_cycle",):
        seq = getattr(inc.payload, "cycle_seq", "?")
        why = (
            f"a replication record of cycle {seq} ({inc.envelope.type}) was dead-lettered: "
            f"{rej.reason}: {rej.detail}; cause: the record cannot be applied as sent; "
            f"recommendation: read its headers in {topics.dlq_of(topics.REPLICATION_DELTAS)}; "
            "the cycle is missing, so the item resyncs at its next cycle"
        )
        async with ctx.pool.acquire() as conn:
            await repo.note_dead_letter(conn, item_id, why)


def _delta_checked(ctx: Context, handler: Handler) -> Handler:
    """`handler` with the partition check first; a record it refuses is noted on its item."""

    async def checked(conn: asyncpg.Connection, inc: Incoming) -> None:
        try:
            _check_partition(ctx, inc)
            await handler(conn, inc)
        except Rejected as rej:
            await _note_dead_letter(ctx, inc, rej)
            raise

    return checked


def _delta_run_checked(ctx: Context, handler: RunHandler) -> RunHandler:
    async def checked(conn: asyncpg.Connection, incs: list[Incoming]) -> None:
        for inc in incs:
            try:
                _check_partition(ctx, inc)
            except Rejected:
                raise RunFallback(
                    "a record on the wrong partition"
                ) from None  # dead-lettered alone
        await handler(conn, incs)

    return checked


def make_delta_prepare(ctx: Context) -> Callable[[list[tuple[Any, EventPayload]]], Awaitable[None]]:
    """The delta pipeline's `prepare` step for a chunk of records: the blocks of every
    correctly signed `BlocksShipped` of the chunk are decoded, verified against their SHA-256
    and written to the replica store in one `put_blocks` per item (one pack append and
    fdatasync; it overlaps the transactions of the previous chunk), before the records are
    handled (`on_blocks`, `on_blocks_run`). Writing verified,
    content-addressed blocks early is what `on_blocks` does first anyway (idempotent;
    unreferenced blocks are garbage-collected); `on_blocks` then finds them in
    `ctx.prestored` and skips decoding and writing. Anything unexpected
    (bad signature, unknown item, undecodable data, a hash mismatch) just leaves the record to
    `on_blocks`, which handles it as always."""

    verify = signature_verifier()

    async def prepare(group: list[tuple[Any, EventPayload]]) -> None:
        batches = [(env, msg) for env, msg in group if isinstance(msg, ev.BlocksShipped)]
        if not batches:
            return
        by_item: dict[tuple[uuid.UUID, str], list[tuple[Any, dict[int, tuple[str, bytes]]]]] = {}
        items: dict[uuid.UUID, dict[str, Any] | None] = {}
        # the geometry a batch is decoded to: its cycle's start in this chunk, else the open
        # cycle (on_blocks checks the bytes against the cycle it finds)
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
                            and (data := _block_bytes(b, disk, msg.compression)) is not None
                        }
                    except ValueError:
                        continue
                    by_item.setdefault((msg.item_id, item["target_site"]), []).append((env, blocks))
        finally:
            RUN_MEMO.reset(token)

        def write(item_id: uuid.UUID, site: str, records: list[Any]) -> None:
            todo = [(i, sha, data) for _, bl in records for i, (sha, data) in bl.items()]
            ctx.store(site).put_blocks(str(item_id), todo)

        for (item_id, site), records in by_item.items():
            try:
                await asyncio.to_thread(write, item_id, site, records)
            except ValueError:  # a hash mismatch: on_blocks finds which and handles it
                continue
            for env, blocks in records:
                ctx.prestored[env.event_id] = (
                    site,
                    {i: data for i, (_, data) in blocks.items()},
                )

    return prepare


def _block_bytes(
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


# ------------------------------------------------------------------ read models


def make_read_model_handlers() -> dict[str, Any]:
    from shared.schemas import inventory as inv
    from shared.schemas import policy as pol

    async def on_vm(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, inv.VmChanged)
        if msg.vm is None:
            await repo.remove_vm(conn, inc.envelope.vault_id, msg.vm_id)
        else:
            await repo.upsert_vm(
                conn, inc.envelope.vault_id, msg.site, msg.vm.model_dump(mode="json")
            )

    async def on_host(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, inv.HostChanged)
        if msg.host is None:
            await repo.remove_host(conn, inc.envelope.vault_id, msg.host_id)
        else:
            await repo.upsert_host(
                conn, inc.envelope.vault_id, msg.site, msg.host.model_dump(mode="json")
            )

    async def on_policy(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, pol.PolicyCreated | pol.PolicyUpdated | pol.PolicyDeleted)
        deleted = isinstance(msg, pol.PolicyDeleted)
        await repo.upsert_policy(
            conn, inc.envelope.vault_id, msg.policy.model_dump(mode="json"), deleted
        )
        if isinstance(msg, pol.PolicyUpdated):
            await conn.execute(
                "UPDATE protected_items SET copy_interval_seconds = $2, updated_at = now()"
                " WHERE policy_id = $1 AND active",
                msg.policy.policy_id,
                msg.policy.settings.copy_frequency_seconds,
            )

    async def on_pairing(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, pol.CloudPairingCreated | pol.CloudPairingRemoved)
        removed = isinstance(msg, pol.CloudPairingRemoved)
        await repo.upsert_pairing(
            conn, inc.envelope.vault_id, msg.pairing.model_dump(mode="json"), removed
        )

    async def on_prerequisites(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, pol.PrerequisitesEvaluated)
        await repo.upsert_prerequisites(conn, inc.envelope.vault_id, msg)

    return {
        "VmChanged": on_vm,
        "HostChanged": on_host,
        "PrerequisitesEvaluated": on_prerequisites,
        "PolicyCreated": on_policy,
        "PolicyUpdated": on_policy,
        "PolicyDeleted": on_policy,
        "CloudPairingCreated": on_pairing,
        "CloudPairingRemoved": on_pairing,
    }


# ------------------------------------------------------------------ agent events


def make_agent_event_handlers(
    ctx: Context, answers: dict[str, Handler] | None = None
) -> dict[str, Any]:
    """Agent events; `answers`: handlers of `CommandCompleted` by command type (failover's)."""
    answers = answers or {}

    async def on_progress(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, cmd.InitialReplicationProgressed)
        item = await repo.get_item(conn, msg.item_id, lock=True)
        if item is None or str(item["source_agent_id"]) != inc.envelope.producer_id:
            raise Rejected("wrong_agent", "progress for an item this agent does not replicate")
        await repo.update_item(
            conn, msg.item_id, initial_progress=msg.model_dump(mode="json", exclude={"item_id"})
        )

    async def on_fault(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, cmd.ReplicationFaulted)
        item = await repo.get_item(conn, msg.item_id, lock=True)
        if item is None or str(item["source_agent_id"]) != inc.envelope.producer_id:
            raise Rejected("wrong_agent", "fault for an item this agent does not replicate")
        if msg.needs_resync and ItemState(item["state"]) is not ItemState.RESYNCHRONIZING:
            await require_resync(ctx, conn, item, f"agent: {msg.reason}")
        else:
            await repo.bump_stat(conn, msg.item_id, "network_failures")

    async def on_replica_applied(conn: asyncpg.Connection, inc: Incoming) -> None:
        """The recovery host's answer to ReplicaPointApplyRequested."""
        msg = inc.payload
        assert isinstance(msg, cmd.CommandCompleted)
        try:
            item_id = uuid.UUID(str(msg.result.get("item_id")))
        except ValueError:
            raise Rejected("invalid_result", "a replica answer names no item") from None
        item = await repo.get_item(conn, item_id, lock=True)
        if item is None or str(item["recovery_agent_id"]) != inc.envelope.producer_id:
            raise Rejected("wrong_agent", "replica answer for an item this agent does not keep")
        if msg.outcome is cmd.CommandOutcome.FAILED:
            await repo.update_item(conn, item_id, replica_error=msg.error)
            return
        seq, roots = msg.result.get("cycle_seq"), msg.result.get("roots")
        if not isinstance(seq, int) or not isinstance(roots, dict):
            raise Rejected("invalid_result", "a replica answer needs cycle_seq and roots")
        if await repo.record_replica_point(conn, item_id, seq, roots):
            latest = max(seq, item["replica_seq"] or 0)
            await repo.update_item(conn, item_id, replica_seq=latest, replica_error=None)
        else:
            await repo.update_item(
                conn,
                item_id,
                replica_error=f"the recovery host's roots for point {seq} are not the source's",
            )

    async def on_completed(conn: asyncpg.Connection, inc: Incoming) -> None:
        msg = inc.payload
        assert isinstance(msg, cmd.CommandCompleted)
        if msg.command_type == "ReplicaPointApplyRequested":
            await on_replica_applied(conn, inc)
            return
        if msg.command_type in answers:
            await answers[msg.command_type](conn, inc)
            return
        if msg.outcome is cmd.CommandOutcome.FAILED:
            log.warning(
                "agent command failed",
                extra={
                    "command_id": str(msg.command_id),
                    "type": msg.command_type,
                    "error": msg.error,
                },
            )
            item_id = msg.result.get("item_id")
            if msg.command_type == "ReplicationEnableRequested" and item_id:
                try:
                    item_uuid = uuid.UUID(str(item_id))
                except ValueError:
                    raise Rejected("bad_result", f"item_id {str(item_id)[:100]!r}") from None
                item = await repo.get_item(conn, item_uuid, lock=True)
                if item is not None and item["active"]:
                    _check_enable_answer(item, inc)
                    await change_state(
                        conn,
                        item,
                        ItemState.ERROR,
                        reason=msg.error,
                        health=Health.CRITICAL,
                        error=(
                            f"agent could not enable replication: {msg.error} (cause: the "
                            "source host could not start tracking the VM's disks; "
                            "recommendation: check the VM's disk images on its host, then "
                            "disable and enable protection again)"
                        ),
                    )

    return {
        "InitialReplicationProgressed": on_progress,
        "ReplicationFaulted": on_fault,
        "CommandCompleted": on_completed,
    }


# ------------------------------------------------------------------ operator actions


def _vm_disks(vm: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"disk_id": d["disk_id"], "path": d.get("path", ""), "size_bytes": d["size_bytes"]}
        for d in vm.get("disks", [])
    ]


async def enable_protection(ctx: Context, vault_id: uuid.UUID, vm_id: str) -> dict[str, Any]:
    """Create the protected item and command the source agent, if the policy service's
    prerequisite verdict for the VM allows it."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        existing = await repo.active_item_for_vm(conn, vault_id, vm_id)
        if existing is not None:
            raise domain.ReplicationError(
                f"VM {vm_id} is already protected (item {existing['item_id']})"
            )
        try:
            domain.check_prerequisites(vm_id, await repo.prerequisites_of(conn, vault_id, vm_id))
        except domain.VerdictPending as exc:
            raise NotYetKnown(exc.message) from None
        context = await repo.protection_context(conn, vault_id, vm_id)
        if context is None:
            raise NotYetKnown(
                f"VM {vm_id} is not known in a paired cloud of this vault with a policy "
                "(check inventory, the cloud pairing and its policy)"
            )
        agent = await repo.agent_named(conn, vault_id, context["host_name"])
        if agent is None:
            raise NotYetKnown(
                f"no host agent registered for host '{context['host_name']}': install and "
                "register the agent on the VM's host first"
            )
        settings = context["settings"]
        vm = context["vm"]
        disks = _vm_disks(vm)
        if not disks:
            raise domain.ReplicationError(f"VM {vm_id} has no disks to replicate")
        too_large = [d for d in disks if d["size_bytes"] > ctx.settings.max_disk_bytes]
        if too_large:
            raise domain.ReplicationError(
                f"VM {vm_id}: disk {too_large[0]['disk_id']} has {too_large[0]['size_bytes']} "
                f"bytes, more than the {ctx.settings.max_disk_bytes} this service protects"
            )
        item_id = uuid.uuid4()
        item = await repo.insert_item(
            conn,
            item_id=item_id,
            vault_id=vault_id,
            vm_id=vm_id,
            vm_name=context["vm_name"],
            pairing_id=context["pairing_id"],
            policy_id=context["policy_id"],
            source_agent_id=agent["producer_id"],
            source_site=context["site"],
            target_site=context["target_site"],
            target_cloud_id=context["target_cloud_id"],
            disks=disks,
            copy_interval_seconds=int(settings["copy_frequency_seconds"]),
            state=ItemState.WAITING_FOR_INITIAL.value,
            recovery_agent_id=await repo.recovery_agent(conn, vault_id, context["target_site"]),
        )
        await emit(
            conn,
            vault_id,
            ev.ProtectionEnabled(
                item_id=item_id,
                vm_id=vm_id,
                vm_name=context["vm_name"],
                source_cloud_id=vm["cloud_id"],
                target_cloud_id=context["target_cloud_id"],
                pairing_id=context["pairing_id"],
                policy_id=context["policy_id"],
                source_agent_id=agent["producer_id"],
            ),
            str(item_id),
        )
        await command(conn, item, enable_command(item, settings))
    return item


def _check_enable_answer(item: dict[str, Any], inc: Incoming) -> None:
    """An enable failure counts only from the item's source agent, in its vault, for the
    enable command the item is waiting on."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    if item["vault_id"] != inc.envelope.vault_id:
        raise Rejected("vault_mismatch", "the item belongs to another vault")
    if str(item["source_agent_id"]) != inc.envelope.producer_id:
        raise Rejected(
            "wrong_answerer",
            f"the enable command was sent to {item['source_agent_id']}, "
            f"not {inc.envelope.producer_id}",
        )
    if msg.command_id != enable_command_id(item):
        raise Rejected("wrong_answerer", f"{msg.command_id} is not the item's enable command")


def enable_command_id(item: dict[str, Any]) -> uuid.UUID:
    return uuid.uuid5(item["item_id"], f"enable:{item['last_committed_seq'] or 0}")


def enable_command(
    item: dict[str, Any], settings: dict[str, Any]
) -> cmd.ReplicationEnableRequested:
    initial = settings.get("initial_replication", "online_now")
    return cmd.ReplicationEnableRequested(
        command_id=enable_command_id(item),
        agent_id=item["source_agent_id"],
        item_id=item["item_id"],
        vm_id=item["vm_id"],
        vm_name=item["vm_name"],
        disks=[cmd.DiskSpec(**d) for d in item["disks"]],
        copy_interval_seconds=int(settings["copy_frequency_seconds"]),
        compression=ev.Compression.ZLIB if settings.get("compression") else ev.Compression.NONE,
        app_consistent_interval_seconds=int(settings.get("app_consistent_frequency_hours", 0))
        * 3600,
        initial_replication=cmd.InitialReplication(initial),
        scheduled_at=settings.get("initial_replication_start_at"),
        export_path=settings.get("offline_export_path"),
        next_cycle_seq=(item["last_committed_seq"] or 0) + 1,
    )


async def _load_for_action(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID
) -> dict[str, Any]:
    item = await repo.get_item(conn, item_id, lock=True)
    if item is None or not item["active"] or item["vault_id"] != vault_id:
        raise domain.ReplicationError(f"protected item {item_id} not found")
    return item


async def pause(ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        item = await _load_for_action(conn, vault_id, item_id)
        domain.check_action(ItemState(item["state"]), "pause")
        await command(
            conn,
            item,
            cmd.ReplicationPauseRequested(
                command_id=uuid.uuid4(), agent_id=item["source_agent_id"], item_id=item_id
            ),
        )
        await change_state(
            conn, item, ItemState.SUSPENDED, reason="paused by operator", paused=True
        )
    return item


async def resume(ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        item = await _load_for_action(conn, vault_id, item_id)
        domain.check_action(ItemState(item["state"]), "resume")
        await command(
            conn,
            item,
            cmd.ReplicationResumeRequested(
                command_id=uuid.uuid4(), agent_id=item["source_agent_id"], item_id=item_id
            ),
        )
        state = (
            ItemState.REPLICATING
            if item["last_committed_seq"] is not None
            else ItemState.WAITING_FOR_INITIAL
        )
        await change_state(conn, item, state, reason="resumed by operator", paused=False)
    return item


async def resync(ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        item = await _load_for_action(conn, vault_id, item_id)
        domain.check_action(ItemState(item["state"]), "resync")
        await require_resync(ctx, conn, item, "manual resync requested")
    return item


async def disable(
    ctx: Context, vault_id: uuid.UUID, item_id: uuid.UUID, delete_replica: bool | None
) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        item = await _load_for_action(conn, vault_id, item_id)
        settings = await repo.policy_settings(conn, item["vault_id"], item["policy_id"])
        delete = (
            delete_replica
            if delete_replica is not None
            else bool(settings.get("delete_replica_on_disable", False))
        )
        await command(
            conn,
            item,
            cmd.ReplicationDisableRequested(
                command_id=uuid.uuid4(), agent_id=item["source_agent_id"], item_id=item_id
            ),
        )
        await repo.drop_cycles(conn, item_id)
        if delete:
            await drop_site_replica(conn, item)
        await change_state(
            conn, item, ItemState.NOT_ENABLED, reason="protection disabled", active=False
        )
        await emit(
            conn,
            vault_id,
            ev.ProtectionDisabled(item_id=item_id, vm_id=item["vm_id"], replica_deleted=delete),
            str(item_id),
        )
    if delete:
        await asyncio.to_thread(ctx.store(item["target_site"]).delete_item, str(item_id))
    with contextlib.suppress(KeyError):  # no RPO series yet
        RPO_SECONDS.remove(str(item_id), item["vm_name"])
    with contextlib.suppress(KeyError):
        RPO_THRESHOLD.remove(str(item_id), item["vm_name"])
    return item


# ------------------------------------------------------------------ periodic work


async def apply_retention(ctx: Context) -> int:
    """Prune recovery points past the policy's window (store first, then the index)."""
    pruned_total = 0
    async with ctx.pool.acquire() as conn:
        items = await repo.active_items(conn)
    for item in items:
        if ItemState(item["state"]) is ItemState.FAILED_OVER:
            continue  # its points are the failover's to choose from, until commit
        async with ctx.pool.acquire() as conn:
            points = await repo.live_points(conn, item["item_id"])
            settings = await repo.policy_settings(conn, item["vault_id"], item["policy_id"])
        if len(points) <= 1:
            continue
        keep = select_retained(
            [
                PointMeta(p["cycle_seq"], p["source_time"], p["point_type"] == "app_consistent")
                for p in points
            ],
            now=datetime.now(UTC),
            retention_hours=int(settings.get("recovery_points", 0)),
            app_consistent_hours=int(settings.get("app_consistent_frequency_hours", 0)),
            keep_recent=ctx.settings.keep_recent_points,
        )
        drop = sorted(p["cycle_seq"] for p in points if p["cycle_seq"] not in keep)
        if not drop:
            continue
        store = ctx.store(item["target_site"])
        try:
            async with ctx.storing(item["item_id"]):
                await asyncio.to_thread(store.prune, str(item["item_id"]), keep)
        except ValueError as exc:  # the item changed meanwhile (e.g. a failover committed)
            log.warning(
                "retention skipped", extra={"item_id": str(item["item_id"]), "why": str(exc)}
            )
            continue
        except OSError as exc:  # the item's health shows a storage failure; retried next round
            log.warning(
                "retention failed", extra={"item_id": str(item["item_id"]), "error": str(exc)}
            )
            continue
        async with ctx.pool.acquire() as conn, conn.transaction():
            await repo.mark_pruned(conn, item["item_id"], drop)
            await emit(
                conn,
                item["vault_id"],
                ev.RecoveryPointsPruned(item_id=item["item_id"], cycle_seqs=drop),
                str(item["item_id"]),
            )
        pruned_total += len(drop)
    return pruned_total


def _error_with_storage(error: str | None, fault: str | None) -> str | None:
    """The item's error: a storage failure while there is one; once it clears, the error it
    had before (a storage failure never hides another error: it is only set over none)."""
    if fault is not None and (error is None or error.startswith(STORAGE_FAULT_PREFIX)):
        return fault
    if fault is None and error is not None and error.startswith(STORAGE_FAULT_PREFIX):
        return None
    return error


STORAGE_FAULT_PREFIX = "replica storage failure"


async def evaluate_health(ctx: Context) -> None:
    """Re-evaluate RPO and health of every item; export them as metrics."""
    now = datetime.now(UTC)
    counts = {h: 0 for h in Health}
    s = ctx.settings
    async with ctx.pool.acquire() as conn:
        items = await repo.active_items(conn)
    for item in items:
        async with ctx.pool.acquire() as conn, conn.transaction():
            item = await repo.get_item(conn, item["item_id"], lock=True) or item
            window_start = now - timedelta(seconds=s.monitoring_window_seconds)
            points = await repo.points_since(
                conn, item["item_id"], max(window_start, item["protected_since"])
            )
            notes = await repo.fault_notes(conn, item["item_id"])
            verdict = domain.evaluate_health(
                domain.HealthInputs(
                    state=ItemState(item["state"]),
                    paused=item["paused"],
                    now=now,
                    protected_since=item["initial_done_at"] or item["protected_since"],
                    last_cycle_at=item["last_cycle_at"],
                    points_in_window=points,
                    copy_interval_seconds=item["copy_interval_seconds"],
                    window_seconds=s.monitoring_window_seconds,
                    stale_log_seconds=s.stale_log_seconds,
                    missed_ratio_warning=s.missed_cycles_warning_ratio,
                    error=item["error"],
                    rpo_seconds=domain.rpo_seconds(now, item["last_point_source_time"]),
                    rpo_threshold_seconds=domain.rpo_threshold_seconds(
                        item["copy_interval_seconds"]
                    ),
                    storage_fault=notes.storage_fault,
                    dead_letter=notes.dead_letter,
                    broker_problem=ctx.broker.problem if ctx.broker else None,
                )
            )
            reasons = list(verdict.reasons)
            error = _error_with_storage(item["error"], notes.storage_fault)
            if (
                verdict.health.value != item["health"]
                or reasons != item["health_reasons"]
                or error != item["error"]
            ):
                await change_state(
                    conn,
                    item,
                    ItemState(item["state"]),
                    reason="; ".join(reasons) or "healthy",
                    health=verdict.health,
                    health_reasons=reasons,
                    error=error,
                )
        counts[verdict.health] += 1
        if ItemState(item["state"]) is ItemState.FAILED_OVER:
            for gauge in (RPO_SECONDS, RPO_THRESHOLD):
                with contextlib.suppress(KeyError):  # the VM runs from its replica: no RPO
                    gauge.remove(str(item["item_id"]), item["vm_name"])
            continue
        rpo = domain.rpo_seconds(now, item["last_point_source_time"])
        if rpo is not None:
            RPO_SECONDS.labels(str(item["item_id"]), item["vm_name"]).set(rpo)
            RPO_THRESHOLD.labels(str(item["item_id"]), item["vm_name"]).set(
                domain.rpo_threshold_seconds(item["copy_interval_seconds"])
            )
    for health, count in counts.items():
        ITEMS_BY_HEALTH.labels(health.value).set(count)
    if time.monotonic() - ctx.store_bytes_at >= STORE_BYTES_EVERY:
        # a walk over every item's pack files (16k for 1 TiB of blocks): now and then only
        ctx.store_bytes_at = time.monotonic()
        STORE_BYTES.set(
            sum(
                await asyncio.gather(
                    *(asyncio.to_thread(store.total_bytes) for store in ctx.stores.values())
                )
            )
            if ctx.stores
            else 0
        )

"""The delta pipeline's handlers: `CycleStarted` opens a cycle, `BlocksShipped` batches are
verified (SHA-256 of every block) and their blocks written to the replica store
(content-addressed, idempotent) and staged in PostgreSQL; `CycleCompleted` commits a recovery
point only if every batch arrived and the replica's Merkle roots equal the source's. Anything
else never yields a point: the item goes to resync and the agent is told to resync (only
differing blocks). A committed point is then fed to the item's recovery host."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from functools import partial
from typing import Any

import asyncpg
from prometheus_client import Counter, Histogram

from services.replication import domain, leaves
from services.replication import repository as repo
from services.replication.context import Context
from services.replication.delta_prepare import block_bytes
from services.replication.feed import FeedIncomplete
from services.replication.item import (
    DEFAULT_BLOCK_SIZE,
    FeedRange,
    ProtectedItem,
    point_type_of,
)
from services.replication.leaves import LeavesMismatch
from services.replication.resync import require_resync, stored_hashes
from services.replication.store import (
    DiskPoint,
    MissingBlock,
    PointManifest,
    RootMismatch,
)
from services.replication.unit_of_work import ItemUnitOfWork
from shared import topics
from shared.faults import crash_point
from shared.kafka.consumers import Handler, RunFallback, RunHandler
from shared.kafka.decode import Incoming, Rejected
from shared.kafka.ranges import RangeUnavailable
from shared.schemas import replication as ev

log = logging.getLogger(__name__)

BYTES_APPLIED = Counter("dr_replication_bytes_applied_total", "Changed-block bytes applied")
BLOCKS_APPLIED = Counter("dr_replication_blocks_applied_total", "Changed blocks applied")
CYCLES = Counter("dr_replication_cycles_total", "Delta cycles by result", ["result"])
FORWARDED_AGAIN = Counter(
    "dr_replication_cycles_forwarded_again_total",
    "Cycles whose batches were forwarded to the recovery host again, read back from the delta "
    "topic (the instance took the partition over, or restarted, mid-cycle)",
)
APPLY_SECONDS = Histogram(
    "dr_replication_apply_latency_seconds",
    "Source capture to committed recovery point",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900),
)


def _check_source(item: ProtectedItem | None, inc: Incoming, item_id: uuid.UUID) -> ProtectedItem:
    """The item, if `inc` may act on it: an active item of its vault, from its source agent."""
    if item is None or not item.active:
        raise Rejected("unknown_item", f"no active protected item {item_id}")
    if item.vault_id != inc.envelope.vault_id:
        raise Rejected("vault_mismatch", "the item belongs to another vault")
    if str(item.source_agent_id) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", "only the item's source agent may ship its cycles")
    return item


async def _item_for(uow: ItemUnitOfWork, inc: Incoming, item_id: uuid.UUID) -> ProtectedItem:
    return _check_source(await uow.load(item_id), inc, item_id)


async def _item_and_cycle(
    uow: ItemUnitOfWork, inc: Incoming, item_id: uuid.UUID, seq: int
) -> tuple[ProtectedItem, dict[str, Any] | None]:
    """The item (locked, checked against the sender) and its open cycle `seq`, None if there
    is none or it was given up on (poisoned)."""
    item = await _item_for(uow, inc, item_id)
    cycle = await repo.open_cycle(uow.conn, item_id, seq)
    return item, None if cycle is None or cycle["poisoned"] else cycle


async def on_cycle_started(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, ev.CycleStarted)
    async with ItemUnitOfWork(conn) as uow:
        item = await _item_for(uow, inc, msg.item_id)
        disks = [d.model_dump() for d in msg.disks]
        problem = item.geometry_problem(
            disks, ctx.settings.max_disk_bytes, ctx.settings.max_block_bytes
        )
        if problem is not None:
            raise Rejected(*problem)
        verdict = item.start_cycle(
            msg.cycle_seq, msg.kind, await repo.unfinished_cycle(conn, msg.item_id)
        )
        if verdict is domain.CycleVerdict.REPLAY:
            CYCLES.labels("replayed").inc()
            raise Rejected(
                "replayed_cycle",
                f"cycle {msg.cycle_seq} <= last committed {item.last_committed_seq}",
            )
        if verdict is domain.CycleVerdict.IGNORE:
            CYCLES.labels("ignored").inc()
            log.info(
                "cycle ignored",
                extra={"item_id": str(msg.item_id), "seq": msg.cycle_seq, "state": item.state},
            )
            return
        if verdict is domain.CycleVerdict.GAP:
            CYCLES.labels("gap").inc()
            why = (await repo.fault_notes(conn, msg.item_id)).dead_letter
            await require_resync(ctx, conn, item, item.gap_reason(msg.cycle_seq, why))
        else:
            await repo.drop_cycles(conn, msg.item_id)  # an unfinished earlier attempt, if any
            if ctx.feed is not None:
                ctx.feed.forget(msg.item_id, up_to=msg.cycle_seq)
            await repo.start_cycle(
                conn,
                msg.item_id,
                msg.cycle_seq,
                msg.kind.value,
                disks,
                msg.source_time,
                msg.app_consistent,
                (inc.partition, inc.offset) if inc.partition >= 0 else None,
            )
        await uow.commit()


async def _stored_blocks(
    ctx: Context, item: ProtectedItem, cycle: dict[str, Any], inc: Incoming
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
    if site != item.target_site:
        ready = {}
    decoded: list[tuple[int | None, str, bytes]] = []
    staged: list[tuple[int, str]] = []
    for block in msg.blocks:
        try:
            data = block_bytes(block, disk, msg.compression, ready.get(block.index))
        except ValueError as exc:
            return staged, 0, ("bad_block", f"block {block.index}: {exc}")
        staged.append((block.index, block.sha256))
        if data is not None:
            decoded.append((block.index, block.sha256, data))
    if not (ready and len(ready) == len(decoded)):
        try:
            async with ctx.storing(msg.item_id):
                await asyncio.to_thread(
                    ctx.put_blocks, item.target_site, msg.item_id, item.recovery_agent_id, decoded
                )
        except ValueError as exc:  # BlockHashMismatch
            return staged, 0, ("block_hash_mismatch", str(exc))
    return staged, sum(len(data) for _, _, data in decoded), None


async def on_blocks_shipped(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, ev.BlocksShipped)
    async with ItemUnitOfWork(conn) as uow:
        item, cycle = await _item_and_cycle(uow, inc, msg.item_id, msg.cycle_seq)
        if cycle is None:
            CYCLES.labels("orphan_batch").inc()
            return  # a batch of a cycle we ignore or already gave up on
        staged, nbytes, why = await _stored_blocks(ctx, item, cycle, inc)
        if why is not None:
            reason, text = why
            await repo.poison_cycle(conn, msg.item_id, msg.cycle_seq, text)
            await require_resync(ctx, conn, item, f"bad block in cycle {msg.cycle_seq}: {text}")
            await uow.commit()
            raise Rejected(reason, text, keep_effects=True)
        crash_point("replication.blocks_stored")
        await repo.stage_batches(
            conn, msg.item_id, msg.cycle_seq, [(msg.batch_no, msg.disk_id, staged, nbytes)]
        )
        await _forward(ctx, item, msg.cycle_seq, [inc])
    BYTES_APPLIED.inc(nbytes)
    BLOCKS_APPLIED.inc(len(staged))


async def on_blocks_shipped_run(
    ctx: Context, conn: asyncpg.Connection, incs: list[Incoming]
) -> None:
    """`on_blocks_shipped` of consecutive batches of one cycle in one transaction: the item, the
    cycle and the producer looked up once, the batches staged in two statements. Any
    batch that is not plain sailing sends the run back to `on_blocks_shipped`, batch by batch."""
    first = incs[0].payload
    assert isinstance(first, ev.BlocksShipped)
    msgs = [inc.payload for inc in incs]
    if any(
        not isinstance(m, ev.BlocksShipped)
        or (m.item_id, m.cycle_seq) != (first.item_id, first.cycle_seq)
        for m in msgs
    ):
        raise RunFallback("batches of more than one cycle")
    async with ItemUnitOfWork(conn) as uow:
        item, cycle = await _item_and_cycle(uow, incs[0], first.item_id, first.cycle_seq)
        for inc in incs[1:]:
            _check_source(item, inc, first.item_id)
        if cycle is None:
            CYCLES.labels("orphan_batch").inc(len(incs))
            return
        batches: list[tuple[int, str, list[tuple[int, str]], int]] = []
        for inc, msg in zip(incs, msgs, strict=True):
            assert isinstance(msg, ev.BlocksShipped)
            staged, nbytes, why = await _stored_blocks(ctx, item, cycle, inc)
            if why is not None:
                raise RunFallback(why[1])
            batches.append((msg.batch_no, msg.disk_id, staged, nbytes))
        crash_point("replication.blocks_stored")
        await repo.stage_batches(conn, first.item_id, first.cycle_seq, batches)
        await _forward(ctx, item, first.cycle_seq, incs)
    BYTES_APPLIED.inc(sum(b[3] for b in batches))
    BLOCKS_APPLIED.inc(sum(len(b[2]) for b in batches))


async def _forward(ctx: Context, item: ProtectedItem, seq: int, incs: list[Incoming]) -> None:
    """The verified batches queued for the item's recovery host's replica feed
    (services/replication/feed.py; acknowledged by the cycle's completion)."""
    agent = item.recovery_agent_id
    if agent is None or ctx.feed is None:
        return
    records = []
    for inc in incs:
        msg = inc.payload
        assert isinstance(msg, ev.BlocksShipped)
        if inc.raw is not None:
            records.append(((msg.disk_id, msg.batch_no), inc.raw))
    await ctx.feed.send(agent, item.item_id, seq, records)


async def on_cycle_completed(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    """Commit the cycle's recovery point if every batch arrived and the roots match; else
    resync."""
    msg = inc.payload
    assert isinstance(msg, ev.CycleCompleted)
    async with ItemUnitOfWork(conn) as uow:
        item, cycle = await _item_and_cycle(uow, inc, msg.item_id, msg.cycle_seq)
        if cycle is None:
            return
        at = inc.offset if inc.partition >= 0 else -1
        latency = await _commit_cycle(ctx, conn, item, cycle, msg, at)
        await uow.commit()
    if latency is not None:
        CYCLES.labels("committed").inc()
        APPLY_SECONDS.observe(latency)


async def _commit_cycle(
    ctx: Context,
    conn: asyncpg.Connection,
    item: ProtectedItem,
    cycle: dict[str, Any],
    msg: ev.CycleCompleted,
    inc_offset: int,
) -> float | None:
    """The cycle's point verified and recorded (returns source capture -> commit seconds), or
    the item sent to resync (None). `inc_offset`: the completion's offset on the delta topic
    (-1: not from Kafka)."""
    batches, blocks, nbytes = await repo.staged_totals(conn, msg.item_id, msg.cycle_seq)
    truncated = domain.incomplete_reason(msg.batches, msg.blocks, batches, blocks)
    if truncated:
        CYCLES.labels("truncated").inc()
        await repo.record_cycle_stats(conn, msg.item_id, False, 0, 0)
        await require_resync(ctx, conn, item, f"cycle {msg.cycle_seq}: {truncated}")
        return None
    changed = await repo.staged_blocks(conn, msg.item_id, msg.cycle_seq)
    feed = NO_FEED
    if item.recovery_agent_id is not None and ctx.feed is not None:
        try:
            feed = await ctx.feed.collect(msg.item_id, msg.cycle_seq, batches)
        except FeedIncomplete as exc:
            log.info(
                "cycle forwarded again from the delta topic",
                extra={"item_id": str(msg.item_id), "seq": msg.cycle_seq, "why": str(exc)},
            )
            try:
                feed = await _forward_again(ctx, item, cycle, msg, inc_offset, batches)
                FORWARDED_AGAIN.inc()
            except (FeedIncomplete, RangeUnavailable) as again:
                CYCLES.labels("feed_incomplete").inc()
                await repo.record_cycle_stats(conn, msg.item_id, False, 0, 0)
                await require_resync(ctx, conn, item, f"cycle {msg.cycle_seq}: {again}")
                return None
    try:
        await _verify_point(ctx, conn, item, cycle, msg, changed)
        await ctx.recovered(msg.item_id)
    except (RootMismatch, MissingBlock, LeavesMismatch) as exc:
        CYCLES.labels("root_mismatch").inc()
        await repo.record_cycle_stats(conn, msg.item_id, False, 0, 0)
        await require_resync(ctx, conn, item, f"cycle {msg.cycle_seq}: {exc}")
        return None
    return await _record_point(conn, item, cycle, msg, changed, nbytes, feed)


async def _verify_point(
    ctx: Context,
    conn: asyncpg.Connection,
    item: ProtectedItem,
    cycle: dict[str, Any],
    msg: ev.CycleCompleted,
    changed: dict[str, dict[int, str]],
) -> None:
    """The cycle's blocks turn the item's latest point into the source's roots: checked on the
    leaf hashes in PostgreSQL for an item whose replica its recovery host keeps (nothing
    stored here), else committed in this service's replica store."""
    manifest = _point_manifest(msg, cycle, changed)
    if ctx.keeps_blocks(item.recovery_agent_id):
        store = ctx.store(item.target_site)
        async with ctx.storing(msg.item_id):
            await asyncio.to_thread(store.commit_point, str(msg.item_id), manifest)
        return
    prev = item.last_committed_seq if item.has_point else None
    await leaves.advance(
        conn,
        item.item_id,
        prev,
        msg.cycle_seq,
        [
            leaves.DiskTarget(d.disk_id, d.size_bytes, d.block_size, d.merkle_root)
            for d in manifest.disks
        ],
        changed,
        partial(_stored_leaves, ctx, item) if prev is not None else None,
    )


async def _stored_leaves(
    ctx: Context, item: ProtectedItem, target: leaves.DiskTarget
) -> tuple[int, bytes] | None:
    """(size, leaf hashes) of the disk at the item's latest point in this service's replica
    store, where its earlier points were verified (an item replicating before its
    verification moved to PostgreSQL); None if the store has none."""
    hashes = await stored_hashes(ctx, item.target_site, item.item_id, target.disk_id)
    if hashes is None:
        return None
    sizes = {d.disk_id: d.size_bytes for d in item.disks}
    return sizes.get(target.disk_id, target.size_bytes), b"".join(hashes)


NO_FEED = FeedRange(None, None, None)


async def _forward_again(
    ctx: Context,
    item: ProtectedItem,
    cycle: dict[str, Any],
    msg: ev.CycleCompleted,
    completed_at: int,
    batches: int,
) -> FeedRange:
    """The cycle's batches forwarded again from the delta topic (`FeedWriter.forward_again`),
    between its start and its completion (`completed_at`)."""
    assert ctx.feed is not None and item.recovery_agent_id is not None
    partition, first = cycle.get("delta_partition"), cycle.get("first_offset")
    if partition is None or first is None or ctx.delta_reader is None or completed_at < 0:
        raise FeedIncomplete("the cycle's records are not on the delta topic (imported)")
    return await ctx.feed.forward_again(
        ctx.delta_reader,
        topics.physical(topics.REPLICATION_DELTAS, ctx.settings.topic_prefix),
        (partition, first + 1, completed_at - 1),
        item.recovery_agent_id,
        msg.item_id,
        msg.cycle_seq,
        batches,
    )


def _point_manifest(
    msg: ev.CycleCompleted, cycle: dict[str, Any], changed: dict[str, dict[int, str]]
) -> PointManifest:
    """The manifest the replica store commits: the source's roots, the cycle's changed blocks."""
    geometry = {d["disk_id"]: d for d in cycle["disks"]}
    return PointManifest(
        seq=msg.cycle_seq,
        kind=msg.kind.value,
        source_time=msg.source_time,
        app_consistent=msg.app_consistent,
        disks=[
            DiskPoint(
                disk_id=root.disk_id,
                size_bytes=root.size_bytes,
                block_size=geometry.get(root.disk_id, {}).get("block_size", DEFAULT_BLOCK_SIZE),
                merkle_root=root.merkle_root,
                changed=changed.get(root.disk_id, {}),
            )
            for root in msg.disks
        ],
    )


async def _record_point(
    conn: asyncpg.Connection,
    item: ProtectedItem,
    cycle: dict[str, Any],
    msg: ev.CycleCompleted,
    changed: dict[str, dict[int, str]],
    nbytes: int,
    feed: FeedRange,
) -> float:
    """A point the store committed: its row and the cycle's stats; the item records
    `RecoveryPointCreated`, its new state and the recovery host's command. Returns source
    capture -> commit seconds."""
    now = datetime.now(UTC)
    latency = (now - msg.source_time).total_seconds()
    changed_count = sum(len(c) for c in changed.values())
    await repo.insert_point(
        conn,
        item_id=msg.item_id,
        cycle_seq=msg.cycle_seq,
        kind=msg.kind.value,
        point_type=point_type_of(msg.app_consistent).value,
        source_time=msg.source_time,
        disks=[d.model_dump() for d in msg.disks],
        changed_blocks=changed_count,
        bytes=nbytes,
    )
    await repo.drop_cycles(conn, msg.item_id, msg.cycle_seq)
    await repo.record_cycle_stats(conn, msg.item_id, True, latency, nbytes)
    item.commit_point(
        msg,
        geometry={d["disk_id"]: d for d in cycle["disks"]},
        changed_blocks=changed_count,
        bytes_stored=nbytes,
        now=now,
        feed=feed,
        keep_from=await repo.oldest_live_point(conn, msg.item_id)
        if item.recovery_agent_id is not None
        else None,
    )
    return latency


def make_delta_handlers(ctx: Context) -> tuple[dict[str, Handler], dict[str, RunHandler]]:
    """(handlers by event type, run handlers by event type) of the delta pipeline."""
    handlers: dict[str, Handler] = {
        "CycleStarted": partial(on_cycle_started, ctx),
        "BlocksShipped": partial(on_blocks_shipped, ctx),
        "CycleCompleted": partial(on_cycle_completed, ctx),
    }
    return (
        {name: _delta_checked(ctx, handler) for name, handler in handlers.items()},
        {"BlocksShipped": _delta_run_checked(ctx, partial(on_blocks_shipped_run, ctx))},
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

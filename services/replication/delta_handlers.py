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

from services.replication import domain
from services.replication import repository as repo
from services.replication.context import PRODUCER_ID, Context
from services.replication.delta_prepare import block_bytes
from services.replication.feed import FeedIncomplete
from services.replication.item import (
    DEFAULT_BLOCK_SIZE,
    FeedRange,
    ProtectedItem,
    point_type_of,
)
from services.replication.resync import require_resync
from services.replication.store import (
    DiskPoint,
    MissingBlock,
    PointManifest,
    RootMismatch,
    StoreError,
)
from services.replication.unit_of_work import ItemUnitOfWork
from shared import topics
from shared.delta_blocks import Batcher, encode_block
from shared.faults import crash_point
from shared.kafka.consumers import Handler, RunFallback, RunHandler
from shared.kafka.decode import Incoming, Rejected
from shared.merkle import block_length, zero_block_hash
from shared.schemas import replication as ev
from shared.schemas.envelope import new_envelope

log = logging.getLogger(__name__)

BYTES_APPLIED = Counter("dr_replication_bytes_applied_total", "Changed-block bytes applied")
BLOCKS_APPLIED = Counter("dr_replication_blocks_applied_total", "Changed blocks applied")
CYCLES = Counter("dr_replication_cycles_total", "Delta cycles by result", ["result"])
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
        store = ctx.store(item.target_site)
        try:
            async with ctx.storing(msg.item_id):
                await asyncio.to_thread(store.put_blocks, str(msg.item_id), decoded)
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
        latency = await _commit_cycle(ctx, conn, item, cycle, msg)
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
) -> float | None:
    """The cycle's point committed in the replica store and recorded (returns source capture
    -> commit seconds), or the item sent to resync (None)."""
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
                "cycle forwarded again from the store",
                extra={"item_id": str(msg.item_id), "seq": msg.cycle_seq, "why": str(exc)},
            )
            try:
                feed = await _forward_from_store(ctx, item, cycle, msg, changed)
            except (FeedIncomplete, StoreError) as again:
                CYCLES.labels("feed_incomplete").inc()
                await repo.record_cycle_stats(conn, msg.item_id, False, 0, 0)
                await require_resync(ctx, conn, item, f"cycle {msg.cycle_seq}: {again}")
                return None
    manifest = _point_manifest(msg, cycle, changed)
    store = ctx.store(item.target_site)
    try:
        async with ctx.storing(msg.item_id):
            await asyncio.to_thread(store.commit_point, str(msg.item_id), manifest)
        await ctx.recovered(msg.item_id)
    except (RootMismatch, MissingBlock) as exc:
        CYCLES.labels("root_mismatch").inc()
        await repo.record_cycle_stats(conn, msg.item_id, False, 0, 0)
        await require_resync(ctx, conn, item, f"cycle {msg.cycle_seq}: {exc}")
        return None
    return await _record_point(conn, item, cycle, msg, changed, nbytes, feed)


NO_FEED = FeedRange(None, None, None)


async def _forward_from_store(
    ctx: Context,
    item: ProtectedItem,
    cycle: dict[str, Any],
    msg: ev.CycleCompleted,
    changed: dict[str, dict[int, str]],
) -> FeedRange:
    """The cycle's blocks, verified and stored in this process's store, forwarded again to the
    recovery host's feed as the replication service's own records (encoded and batched as an
    agent ships them): for a cycle whose batches this process did not all forward itself (it
    restarted, or took the partition over, mid-cycle). The feed is written by this service
    only, so the host takes them as it takes the forwarded ones: each block checked against its
    SHA-256, the point against its roots."""
    assert ctx.feed is not None and item.recovery_agent_id is not None
    feed, agent, store = ctx.feed, item.recovery_agent_id, ctx.store(item.target_site)
    geometry = {d["disk_id"]: d for d in cycle["disks"]}
    feed.forget(msg.item_id, up_to=msg.cycle_seq)
    batcher = Batcher(msg.item_id, msg.cycle_seq, ev.Compression.NONE)

    async def send(batches: list[ev.BlocksShipped]) -> None:
        records = [
            (
                (b.disk_id, b.batch_no),
                new_envelope(b, vault_id=item.vault_id, producer_id=PRODUCER_ID).to_bytes(),
            )
            for b in batches
        ]
        await feed.send(agent, msg.item_id, msg.cycle_seq, records)
        await feed.settle(msg.item_id, msg.cycle_seq)  # memory: one chunk at a time

    # a chunk of blocks read from the store at a time: an initial cycle holds a whole disk
    for disk_id, blocks in changed.items():
        disk = geometry[disk_id]
        ordered = sorted(blocks.items())
        for start in range(0, len(ordered), ev.MAX_BLOCKS_PER_BATCH):
            chunk = ordered[start : start + ev.MAX_BLOCKS_PER_BATCH]
            stored = await asyncio.to_thread(
                store.read_blocks, str(msg.item_id), [(disk_id, i, sha) for i, sha in chunk]
            )
            full: list[ev.BlocksShipped] = []
            for index, sha in chunk:
                length = block_length(index, disk["size_bytes"], disk["block_size"])
                data = stored.get(sha)
                if data is None and sha == zero_block_hash(length).hex():
                    data = bytes(length)  # never stored: encoded as a zero block
                if data is None:
                    raise FeedIncomplete(f"block {index} of disk {disk_id} is not stored here")
                batch = batcher.add(disk_id, encode_block(index, data, ev.Compression.NONE))
                full.extend([batch] if batch else [])
            await send(full)
    last = batcher.flush()
    await send([last] if last else [])
    return await feed.collect(msg.item_id, msg.cycle_seq, batcher.batch_no)


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

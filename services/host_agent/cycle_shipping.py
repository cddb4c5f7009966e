"""One replication cycle of an item, step by step: capture (journals sealed, disks frozen at
one instant under the VM's write lock), the Merkle diff of a resync or of scan mode, the
blocks read from the snapshots and sent in batches between CycleStarted and CycleCompleted,
then the new state recorded and the cycle accounted.

A cycle number is burnt (persisted as used) before its first message leaves; a cycle that has
begun is sent to the end, retrying through broker outages; after a crash the next cycle (the
next number) re-ships the union of every unshipped journal segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Histogram

from services.host_agent.cycles import CycleSink, FileSink
from services.host_agent.item_record import ReplicationPhase
from services.host_agent.tracked_item import LAST_CYCLE, TrackedItem
from services.host_agent.tracking import (
    Journal,
    Snapshot,
    TrackedDisk,
    disk_blocks,
    save_leaves,
)
from shared.delta_blocks import Batcher, EncodedBlock, encode_block
from shared.merkle import BLOCK_SIZE, HASH_SIZE, block_hash
from shared.schemas.agent import InitialReplicationProgressed
from shared.schemas.replication import (
    Compression,
    CycleCompleted,
    CycleKind,
    CycleStarted,
    DiskGeometry,
    DiskRoot,
)

log = logging.getLogger(__name__)

CYCLES = Counter("dr_agent_cycles_shipped_total", "Cycles fully shipped", ["kind"])
BLOCKS = Counter("dr_agent_blocks_shipped_total", "Blocks shipped", ["kind"])
BYTES = Counter("dr_agent_bytes_shipped_total", "Bytes of cycle messages shipped", ["kind"])
CYCLE_SECONDS = Histogram(
    "dr_agent_cycle_seconds",
    "Capture to last message of a cycle",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

PROGRESS_SECONDS = 2.0
READ_CHUNK = 64


class CycleShipper(TrackedItem):
    """Ships the cycles of one item (`ship_cycle`); `ItemReplicator` decides when."""

    def _capture(self, kind: CycleKind) -> tuple[datetime, dict[str, set[int]]]:
        """Under the VM lock: seal journals and freeze the disks (one instant for all)."""
        plan: dict[str, set[int]] = {}
        lock = self.host.vm_lock(self.record.vm_name)
        with lock:
            for disk in self.disks:
                disk.open()
                full = kind in (CycleKind.INITIAL, CycleKind.RESYNC) or disk.journal is None
                if full:
                    if disk.journal is not None:
                        disk.journal.discard()
                    disk.journal = Journal.create(self.folder, disk.key, disk.blocks)
                    indexes = set(range(disk.blocks))
                else:
                    assert disk.journal is not None
                    indexes = disk.journal.seal()
                    if disk.key in self._scan:
                        indexes = set(range(disk.blocks))
                plan[disk.key] = indexes
                disk.snapshot = Snapshot(disk.fd, disk.size_bytes, set(indexes), lock, self.folder)
            source_time = datetime.now(UTC)
        self.record.journals = {
            d.key: d.journal.state.model_copy(deep=True) for d in self.disks if d.journal
        }
        self.save()
        return source_time, plan

    async def ship_cycle(
        self,
        kind: CycleKind,
        *,
        sink: CycleSink | None = None,
        replica: dict[str, tuple[int, bytes]] | None = None,
        seq: int | None = None,
    ) -> dict[str, Any]:
        r = self.record
        started = time.monotonic()
        source_time, plan = self._capture(kind)
        try:
            if kind is CycleKind.RESYNC:
                await self._diff(plan, replica or {})
            elif self._scan:
                await self._diff(plan, None)
            return await self._ship(kind, source_time, plan, sink, seq or r.next_seq, started)
        except BaseException:
            if isinstance(sink, FileSink):
                sink.abort()
            raise
        finally:
            for disk in self.disks:
                if disk.snapshot is not None:
                    disk.snapshot.close()
                    disk.snapshot = None

    async def _diff(
        self, plan: dict[str, set[int]], replica: dict[str, tuple[int, bytes]] | None
    ) -> None:
        """Hash the frozen disks and keep only the blocks that differ from the reference:
        the replica's leaves (resync) or the last shipped leaves (scan mode)."""
        for disk in self.disks:
            if replica is None and disk.key not in self._scan:
                continue
            snap = disk.snapshot
            assert snap is not None
            reference = (
                _replica_reference(disk, *replica.get(disk.disk_id, (0, b"")))
                if replica is not None
                else disk.tree.leaf
            )
            differing = await asyncio.to_thread(
                _hash_pass, disk, snap, sorted(snap.pending), reference
            )
            snap.release(set(plan[disk.key]) - differing)
            plan[disk.key] = differing

    async def _ship(
        self,
        kind: CycleKind,
        source_time: datetime,
        plan: dict[str, set[int]],
        sink: CycleSink | None,
        seq: int,
        started: float,
    ) -> dict[str, Any]:
        """Send the captured cycle (`plan`: disk key -> blocks to send), then record it as
        shipped: CycleStarted, the blocks disk by disk, CycleCompleted, the new state."""
        offline = isinstance(sink, FileSink)
        out: CycleSink = sink or self.wiring.sink(self.item_id, seq)
        app = self._app_consistent(source_time)
        if not offline:
            self.record.next_seq = seq + 1  # burnt before anything with this number leaves
            self.save()
        cycle = _Cycle(
            kind, seq, source_time, app, Batcher(self.item_id, seq, self.record.compression)
        )
        cycle.sent = await out.emit(self._cycle_started(cycle))
        progress = self._progress(kind, plan)
        for disk in self.disks:
            await self._send_disk(disk, sorted(plan[disk.key]), out, cycle, progress)
        roots = {d.disk_id: d.tree.root_hex() for d in self.disks}
        cycle.sent += await out.emit(self._cycle_completed(cycle, roots))
        await out.close()
        await progress.finish()
        self._record_shipped(cycle, plan, roots)
        self._account(cycle, time.monotonic() - started, offline)
        return {
            "cycle_seq": seq,
            "kind": kind.value,
            "blocks": cycle.batcher.blocks,
            "roots": roots,
        }

    def _cycle_started(self, cycle: _Cycle) -> CycleStarted:
        return CycleStarted(
            item_id=self.item_id,
            cycle_seq=cycle.seq,
            kind=cycle.kind,
            disks=[
                DiskGeometry(disk_id=d.disk_id, size_bytes=d.size_bytes, block_size=BLOCK_SIZE)
                for d in self.disks
            ],
            source_time=cycle.source_time,
            app_consistent=cycle.app_consistent,
        )

    def _progress(self, kind: CycleKind, plan: dict[str, set[int]]) -> _Progress:
        total_blocks = sum(len(v) for v in plan.values())
        total_bytes = sum(
            min(BLOCK_SIZE, d.size_bytes - i * BLOCK_SIZE) for d in self.disks for i in plan[d.key]
        )
        return _Progress(self, kind, total_blocks, total_bytes)

    async def _send_disk(
        self,
        disk: TrackedDisk,
        indexes: list[int],
        out: CycleSink,
        cycle: _Cycle,
        progress: _Progress,
    ) -> None:
        """The blocks `indexes` of `disk` from its snapshot, in batches; the next chunk is read
        and encoded (a thread) while this one is sent. Each block's leaf hash is updated."""
        compression = self.record.compression
        incremental = len(indexes) < disk.blocks // 16
        chunks = [indexes[s : s + READ_CHUNK] for s in range(0, len(indexes), READ_CHUNK)]
        ahead: asyncio.Future[list[EncodedBlock]] | None = None
        try:
            for n, chunk in enumerate(chunks):
                encoded = await (ahead or asyncio.to_thread(_read_encode, disk, chunk, compression))
                ahead = None
                if n + 1 < len(chunks):
                    ahead = asyncio.ensure_future(
                        asyncio.to_thread(_read_encode, disk, chunks[n + 1], compression)
                    )
                for block in encoded:
                    disk.tree.set_leaf(block.block.index, block.digest, rehash=incremental)
                    batch = cycle.batcher.add(disk.disk_id, block)
                    if batch is not None:
                        cycle.sent += await out.emit(batch)
                batch = cycle.batcher.flush() if n + 1 == len(chunks) else None
                if batch is not None:
                    cycle.sent += await out.emit(batch)
                await progress.advance(encoded)
        finally:
            if ahead is not None:  # failed mid-way: let the read end before the snapshot
                with contextlib.suppress(Exception):
                    await ahead

    def _cycle_completed(self, cycle: _Cycle, roots: dict[str, str]) -> CycleCompleted:
        return CycleCompleted(
            item_id=self.item_id,
            cycle_seq=cycle.seq,
            kind=cycle.kind,
            batches=cycle.batcher.batch_no,
            blocks=cycle.batcher.blocks,
            disks=[
                DiskRoot(disk_id=d.disk_id, size_bytes=d.size_bytes, merkle_root=roots[d.disk_id])
                for d in self.disks
            ],
            source_time=cycle.source_time,
            app_consistent=cycle.app_consistent,
        )

    def _record_shipped(
        self, cycle: _Cycle, plan: dict[str, set[int]], roots: dict[str, str]
    ) -> None:
        """The cycle is out: persist what the replica now holds, then forget the journal."""
        r = self.record
        full = cycle.kind in (CycleKind.INITIAL, CycleKind.RESYNC)
        for disk in self.disks:
            changed = None if full or disk.key in self._scan else plan[disk.key]
            save_leaves(self.folder / f"{disk.key}.leaves", disk.tree, changed)
            if disk.journal is not None:
                disk.journal.shipped()
        self._scan.clear()
        r.next_seq = cycle.seq + 1
        r.journals = {d.key: d.journal.state.model_copy(deep=True) for d in self.disks if d.journal}
        r.last_cycle_seq, r.last_cycle_kind = cycle.seq, cycle.kind.value
        r.last_cycle_at = datetime.now(UTC)
        r.roots = roots
        if cycle.app_consistent:
            r.last_app_consistent_at = cycle.source_time
        if full:
            r.move_to(ReplicationPhase.REPLICATING)
            r.fault = ""
        if cycle.kind is CycleKind.FINAL:
            r.move_to(ReplicationPhase.SYNCED)
        self.save()

    def _account(self, cycle: _Cycle, elapsed: float, offline: bool) -> None:
        """Metrics and the log line of a shipped cycle."""
        kind, blocks = cycle.kind.value, cycle.batcher.blocks
        CYCLES.labels(kind).inc()
        BLOCKS.labels(kind).inc(blocks)
        BYTES.labels(kind).inc(cycle.sent)
        CYCLE_SECONDS.labels(kind).observe(elapsed)
        LAST_CYCLE.labels(str(self.item_id)).set(time.time())
        self._journal_gauge()
        log.info(
            "cycle shipped",
            extra={
                "item_id": str(self.item_id),
                "cycle_seq": cycle.seq,
                "kind": kind,
                "blocks": blocks,
                "batches": cycle.batcher.batch_no,
                "bytes": cycle.sent,
                "seconds": round(elapsed, 3),
                "offline": offline,
            },
        )

    def _app_consistent(self, at: datetime) -> bool:
        interval = self.record.app_consistent_interval_seconds
        last = self.record.last_app_consistent_at
        return interval > 0 and (last is None or (at - last).total_seconds() >= interval)


@dataclass
class _Cycle:
    """One cycle on its way out: what CycleStarted and CycleCompleted say, the batches so far
    and the bytes sent."""

    kind: CycleKind
    seq: int
    source_time: datetime
    app_consistent: bool
    batcher: Batcher
    sent: int = 0


class _Progress:
    """InitialReplicationProgressed every few seconds and at the end (initial and resync)."""

    def __init__(self, item: CycleShipper, kind: CycleKind, blocks: int, size: int) -> None:
        self.item = item
        self.on = kind in (CycleKind.INITIAL, CycleKind.RESYNC)
        self.blocks_total, self.bytes_total = blocks, size
        self.blocks_done = self.bytes_done = 0
        self.last = time.monotonic()

    async def advance(self, encoded: list[EncodedBlock]) -> None:
        self.blocks_done += len(encoded)
        self.bytes_done += sum(b.raw_len for b in encoded)
        if self.on and time.monotonic() - self.last >= PROGRESS_SECONDS:
            await self._send()

    async def finish(self) -> None:
        if self.on:
            await self._send()

    async def _send(self) -> None:
        self.last = time.monotonic()
        await self.item.publish(
            InitialReplicationProgressed(
                item_id=self.item.item_id,
                bytes_done=self.bytes_done,
                bytes_total=self.bytes_total,
                blocks_done=self.blocks_done,
                blocks_total=self.blocks_total,
            )
        )


def _replica_reference(disk: TrackedDisk, size: int, raw: bytes) -> Callable[[int], bytes | None]:
    """The replica's leaf of block i, or None where the replica has no such full block."""
    blocks = disk_blocks(size) if size else 0
    partial_tail = size != disk.size_bytes and size % BLOCK_SIZE != 0
    whole = blocks - 1 if partial_tail else blocks  # the replica's short last block differs

    def reference(i: int) -> bytes | None:
        return raw[i * HASH_SIZE : (i + 1) * HASH_SIZE] if i < whole else None

    return reference


def _read_encode(
    disk: TrackedDisk, indexes: list[int], compression: Compression
) -> list[EncodedBlock]:
    snap = disk.snapshot
    assert snap is not None
    out = [encode_block(i, snap.read(i), compression) for i in indexes]
    snap.release(indexes)
    return out


def _hash_pass(
    disk: TrackedDisk,
    snap: Snapshot,
    indexes: list[int],
    reference: Callable[[int], bytes | None],
) -> set[int]:
    differing = set()
    for i in indexes:
        digest = block_hash(snap.read(i))
        if reference(i) != digest:
            differing.add(i)
        else:
            disk.tree.set_leaf(i, digest, rehash=False)
    return differing

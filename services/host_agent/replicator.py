"""Replication of protected items: initial replication, then one delta cycle per copy interval
(sooner when at least `EARLY_CYCLE_BLOCKS` blocks changed: the interval is the longest gap),
resync by Merkle diff, the final cycle of a shutdown, pause / resume, faults.

Per item, `<state_dir>/items/<item_id>/`: `item.json` (the enable command's settings and the
progress: next cycle number, phase, journal epochs), the disks' journals and shipped leaf hashes
(see `tracking`), `open` while the agent runs, `resync/<resync_id>/` the replica's hashes as
they arrive (`resync_chunks`). One asyncio task per item runs its cycles in order; commands only
change the record and wake it.

A cycle covers every disk of the VM at one instant: under the VM's write lock the journals are
sealed and copy-on-write snapshots taken; the blocks are then read from the snapshots while the
workload goes on. A cycle number is burnt (persisted as used) before its first message leaves;
a cycle that has begun is sent to the end, retrying through broker outages; after a crash the
next cycle (the next number) re-ships the union of every unshipped journal segment.

An item is in one `ReplicationPhase` at a time (item_record.py lists the moves allowed):
`initial` until its first full cycle (initial or resync) is out, then `replicating` (a delta
per interval), `resync_required` after a fault (nothing ships until a resync's full cycle),
`synced` after the final cycle of a shutdown (until the VM runs again). Pausing is the
operator's hold on top of the phase: a paused item keeps its phase and ships no deltas.

Enabled `seeded` (reverse replication: the target already holds an older copy of the disks),
an item ships no initial cycle and no deltas; the first `ResyncRequested` ships, as cycle
`cycle_seq`, only the blocks whose hashes differ from that copy, and deltas follow from there
(its capture starts the journals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from services.host_agent.cycles import (
    Batcher,
    CycleSink,
    EncodedBlock,
    FileSink,
    Signer,
    SinkFactory,
    encode_block,
    export_path,
)
from services.host_agent.item_record import ItemRecord, ReplicationPhase, disk_key, image_stat
from services.host_agent.resync_chunks import load_replica_leaves, store_resync_chunk
from services.host_agent.tracking import (
    HostIO,
    Journal,
    JournalState,
    JournalUntrusted,
    Snapshot,
    TrackedDisk,
    boot_id,
    disk_blocks,
    load_leaves,
    save_leaves,
)
from shared.files import OutsideRoots, confined, write_atomic
from shared.merkle import BLOCK_SIZE, HASH_SIZE, MerkleTree, block_hash
from shared.metrics import reason_label
from shared.schemas.agent import (
    DiskSpec,
    InitialReplication,
    InitialReplicationProgressed,
    ReplicationEnableRequested,
    ReplicationFaulted,
    ResyncRequested,
)
from shared.schemas.envelope import EventPayload
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
JOURNAL_RECORDS = Gauge("dr_agent_journal_records", "Unshipped journal records", ["item_id"])
LAST_CYCLE = Gauge(
    "dr_agent_last_cycle_timestamp_seconds", "When the last cycle was shipped", ["item_id"]
)
FAULTS = Counter("dr_agent_replication_faults_total", "Items that need a resync", ["reason"])

CHANGE_LOG_LIMIT = 0.5  # of the disk size (docs/reference.md: resync when the log outgrows 50 %)
PROGRESS_SECONDS = 2.0
READ_CHUNK = 64
# A delta of this many distinct blocks (4 MiB) ships as soon as the previous cycle is done,
# without waiting for the copy interval's tick (the interval bounds the RPO; earlier is fine:
# more points only lower the RPO and the missed-cycles count).
EARLY_CYCLE_BLOCKS = 64
# An early cycle lets a write burst finish first (a pause of this long between writes), for
# at most EARLY_SETTLE_MAX: one cycle then carries the burst instead of its first 64 blocks,
# with the rest a cycle later.
EARLY_SETTLE_QUIET = 0.005
EARLY_SETTLE_MAX = 0.25


Emit = Callable[[EventPayload], Awaitable[None]]


@dataclass(frozen=True)
class Wiring:
    """How an item reaches the outside: signing, agent events, where cycles go."""

    sign: Signer
    emit: Emit  # an agent event on `agent.events.v1` (retried until sent)
    sink: SinkFactory  # (item id, cycle seq) -> where a cycle goes (Kafka)


class CommandFailed(Exception):
    """The command can't be carried out; the message goes back in CommandCompleted."""


class ItemReplicator:
    """One protected item: its disks, record and cycle loop."""

    def __init__(
        self,
        folder: Path,
        record: ItemRecord,
        host: HostIO,
        wiring: Wiring,
    ) -> None:
        self.folder = folder
        self.record = record
        self.host = host
        self.wiring = wiring
        self.disks: list[TrackedDisk] = []
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._due = 0.0
        self._scan: set[str] = set()
        self._resync: ResyncRequested | None = None
        self._final: list[asyncio.Future[dict[str, Any]]] = []
        self.state = "starting"
        self._fault_at_start: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._early = False  # a big delta is waiting: ship it before the next tick
        self._last_write = 0.0  # time.monotonic() of the latest journaled write

    @property
    def item_id(self) -> uuid.UUID:
        return self.record.item_id

    def save(self) -> None:
        write_atomic(self.folder / "item.json", self.record.model_dump_json(indent=1).encode())

    # ------------------------------------------------------------------ open / close

    async def open(self) -> None:
        await asyncio.to_thread(self._load)
        self._journal_gauge()

    def _load(self) -> None:
        """Load the disks' trees and journals; a journal that can't be trusted faults."""
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / "open"
        left_open = marker.read_text().strip() if marker.exists() else None
        write_atomic(marker, boot_id().encode())
        problems: list[str] = []
        for i, spec in enumerate(self.record.disks):
            path = Path(spec.path)
            key = disk_key(i)
            blocks = disk_blocks(spec.size_bytes)
            tree = None
            if self.record.phase is not ReplicationPhase.INITIAL:
                tree = load_leaves(self.folder / f"{key}.leaves", blocks)
                if tree is None:
                    problems.append(f"{key}: shipped leaf hashes lost")
            disk = TrackedDisk(spec.disk_id, key, path, spec.size_bytes, tree or MerkleTree(blocks))
            if not path.is_file() or path.stat().st_size != spec.size_bytes:
                problems.append(f"{key}: image {path} missing or resized")
            else:
                disk.open()
            self.disks.append(disk)
            if not self.record.journaling:
                continue
            if left_open is not None and left_open != boot_id():
                problems.append(f"{key}: the host stopped uncleanly")
                continue
            try:
                state = self.record.journals.get(key, JournalState())
                disk.journal = Journal.recover(self.folder, key, blocks, state)
            except JournalUntrusted as exc:
                problems.append(str(exc))
                continue
            if left_open is None and self.record.closed_stats.get(key) not in (
                None,
                tuple(image_stat(path)),
            ):
                self._scan.add(key)  # written while the agent was off: scan mode finds it
        for disk in self.disks:
            self.host.track(disk)
        if problems and self.record.journaling:
            reason = "unclean stop" if left_open is not None else "journal lost"
            self._fault_at_start = f"{reason}: {'; '.join(problems)}"

    async def close(self) -> None:
        """Clean stop: journals synced, image stats recorded, the `open` marker removed."""
        await self._cancel()
        for disk in self.disks:
            if disk.journal is not None:
                disk.journal.sync()
                self.record.journals[disk.key] = disk.journal.state
            if disk.path.exists():
                self.record.closed_stats[disk.key] = image_stat(disk.path)
            self.host.untrack(disk)
            disk.close()
        self.save()
        (self.folder / "open").unlink(missing_ok=True)

    async def discard(self) -> None:
        """Disable: stop and forget the item's tracking state."""
        await self._cancel()
        for disk in self.disks:
            self.host.untrack(disk)
            if disk.journal is not None:
                disk.journal.discard()
            disk.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        for gauge in (JOURNAL_RECORDS, LAST_CYCLE):
            with contextlib.suppress(KeyError):
                gauge.remove(str(self.item_id))

    async def _cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        for fut in self._final:
            if not fut.done():
                fut.set_exception(CommandFailed("replication stopped before the final cycle"))
        self._final = []

    # ------------------------------------------------------------------ commands

    def wake(self) -> None:
        self._wake.set()

    def request_resync(self, command: ResyncRequested) -> None:
        self._resync = command
        self.wake()

    async def final_cycle(self) -> dict[str, Any]:
        if self.record.phase is ReplicationPhase.RESYNC_REQUIRED:
            raise CommandFailed(f"item needs a resync first ({self.record.fault})")
        if self.record.phase is ReplicationPhase.INITIAL:
            raise CommandFailed("initial replication has not finished")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._final.append(fut)
        self.wake()
        return await fut

    async def fault(self, reason: str) -> None:
        """The journal can't go on: drop it, stop delta cycles, ask for a resync."""
        log.warning("replication faulted", extra={"item_id": str(self.item_id), "reason": reason})
        FAULTS.labels(reason_label(reason)).inc()
        for disk in self.disks:
            if disk.journal is not None:
                disk.journal.discard()
                disk.journal = None
        self.record.move_to(ReplicationPhase.RESYNC_REQUIRED)
        self.record.fault = reason
        self.record.journals = {}
        self.save()
        self._journal_gauge()
        await self.publish(
            ReplicationFaulted(item_id=self.item_id, reason=reason, needs_resync=True)
        )

    def resume_after_final(self) -> None:
        """The VM runs again after its final cycle: deltas follow from the next tick."""
        if self.record.phase is ReplicationPhase.SYNCED:
            self.record.move_to(ReplicationPhase.REPLICATING)
            self.save()
            self.wake()

    async def publish(self, payload: EventPayload) -> None:
        await self.wiring.emit(payload)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for disk in self.disks:
            disk.on_write = self._written
        self.task = asyncio.create_task(self._supervised(), name=f"item-{self.item_id}")

    async def _supervised(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.state = "error"
                log.exception("item loop failed; retrying", extra={"item_id": str(self.item_id)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._fault_at_start is not None:
            reason, self._fault_at_start = self._fault_at_start, None
            await self.fault(reason)
        if self.record.phase is ReplicationPhase.INITIAL and not self.seeded:
            await self.initial_replication()
        self._due = loop.time() + self.record.copy_interval_seconds
        while True:
            self.state = self._describe()
            timeout = max(0.0, self._due - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self._resync is not None:
                command, self._resync = self._resync, None
                await self.resync(command)
                self._due = loop.time() + self.record.copy_interval_seconds
                continue
            if self._final:
                waiters, self._final = self._final, []
                try:
                    result = await self.ship_cycle(CycleKind.FINAL)
                except Exception as exc:
                    for fut in waiters:
                        fut.set_exception(exc)
                    raise
                for fut in waiters:
                    fut.set_result(result)
                continue
            early, self._early = self._early, False
            if loop.time() < self._due and not (early and self._big_delta()):
                continue
            if early and loop.time() < self._due:
                await self._burst_settled()
            self._due = loop.time() + self.record.copy_interval_seconds
            self._journal_gauge()
            if self.record.paused and await self.check_change_log():
                continue  # (a shipping item drains its log every cycle)
            if self.record.paused or self.record.phase is not ReplicationPhase.REPLICATING:
                continue  # (seeded: nothing ships before the resync against the seed)
            await self.ship_cycle(CycleKind.DELTA)

    def _big_delta(self) -> bool:
        """At least `EARLY_CYCLE_BLOCKS` distinct blocks written since the last capture."""
        return (
            sum(len(d.journal.active) for d in self.disks if d.journal is not None)
            >= EARLY_CYCLE_BLOCKS
        )

    async def _burst_settled(self) -> None:
        """Wait until writes pause for `EARLY_SETTLE_QUIET` (at most `EARLY_SETTLE_MAX`)."""
        deadline = time.monotonic() + EARLY_SETTLE_MAX
        while True:
            now = time.monotonic()
            quiet = now - self._last_write
            if quiet >= EARLY_SETTLE_QUIET or now >= deadline:
                return
            await asyncio.sleep(min(EARLY_SETTLE_QUIET - quiet, deadline - now))

    def _written(self) -> None:
        """After a journaled write (under the VM lock, any thread): a big delta wakes the
        loop to ship it now rather than at the next tick. The copy interval stays the longest
        time between cycles (the RPO bound); an early cycle restarts it. Small trickles wait
        for the tick, so a busy host does not turn into a stream of tiny cycles."""
        self._last_write = time.monotonic()
        if self._early or self._loop is None or not self._big_delta():
            return
        self._early = True
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._wake.set)

    @property
    def seeded(self) -> bool:
        """Enabled `seeded` and still waiting for the resync against the replica's seed."""
        r = self.record
        return r.initial_replication is InitialReplication.SEEDED and (
            r.phase is ReplicationPhase.INITIAL
        )

    def _describe(self) -> str:
        phase = self.record.phase
        if phase is ReplicationPhase.INITIAL:
            return "waiting_for_resync" if self.seeded else "initial_replication"
        if phase is ReplicationPhase.REPLICATING and self.record.paused:
            return "paused"
        return phase.value

    async def initial_replication(self) -> None:
        r = self.record
        if r.initial_replication is InitialReplication.ONLINE_SCHEDULED and r.scheduled_at:
            self.state = "waiting_for_initial_replication"
            wait = (r.scheduled_at - datetime.now(UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(wait)
        self.state = "initial_replication"
        sink: CycleSink | None = None
        if r.initial_replication is InitialReplication.OFFLINE and r.export_path:
            path = export_path(Path(r.export_path), r.item_id, r.next_seq)
            sink = FileSink(self.wiring.sign, path)
        await self.ship_cycle(CycleKind.INITIAL, sink=sink)

    async def check_change_log(self) -> bool:
        for disk in self.disks:
            journal = disk.journal
            if journal is not None and journal.records * BLOCK_SIZE > (
                CHANGE_LOG_LIMIT * disk.size_bytes
            ):
                await self.fault(
                    f"change log over {int(CHANGE_LOG_LIMIT * 100)} % of disk {disk.disk_id}"
                )
                return True
        return False

    async def resync(self, command: ResyncRequested) -> None:
        folder = self.folder / "resync" / str(command.resync_id)
        replica = load_replica_leaves(folder)
        try:
            await self.ship_cycle(CycleKind.RESYNC, replica=replica, seq=command.cycle_seq)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ one cycle

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

    def _journal_gauge(self) -> None:
        records = sum(d.journal.records for d in self.disks if d.journal is not None)
        JOURNAL_RECORDS.labels(str(self.item_id)).set(records)

    def status(self) -> dict[str, Any]:
        r = self.record
        return {
            "item_id": str(r.item_id),
            "vm_id": r.vm_id,
            "vm_name": r.vm_name,
            "state": self.state,
            "phase": r.phase.value,
            "initial_done": r.initial_done,
            "paused": r.paused,
            "needs_resync": r.phase is ReplicationPhase.RESYNC_REQUIRED,
            "fault": r.fault,
            "next_cycle_seq": r.next_seq,
            "last_cycle_seq": r.last_cycle_seq,
            "last_cycle_kind": r.last_cycle_kind,
            "last_cycle_at": r.last_cycle_at.isoformat() if r.last_cycle_at else None,
            "journal_records": sum(d.journal.records for d in self.disks if d.journal),
            "roots": r.roots,
            "disks": [
                {"disk_id": d.disk_id, "path": str(d.path), "size_bytes": d.size_bytes}
                for d in self.disks
            ],
        }


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

    def __init__(self, item: ItemReplicator, kind: CycleKind, blocks: int, size: int) -> None:
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


# ---------------------------------------------------------------------- all items


def _confine(path: str, roots: Sequence[Path] | None, what: str) -> None:
    if roots is None:
        return
    try:
        confined(path, roots)
    except OutsideRoots as exc:
        raise CommandFailed(f"{what}: {exc}") from None


def _disk_problem(spec: DiskSpec) -> str | None:
    path = Path(spec.path)
    if not path.is_file():
        return f"no image file at {spec.path}"
    if path.stat().st_size != spec.size_bytes:
        return f"image is {path.stat().st_size} bytes, the command says {spec.size_bytes}"
    return None


class Replicator:
    """Every protected item of this host."""

    def __init__(
        self,
        state_dir: Path,
        host: HostIO,
        wiring: Wiring,
        disk_roots: Sequence[Path] | None = None,
        export_roots: Sequence[Path] | None = None,
    ) -> None:
        """`disk_roots`/`export_roots`: the folders a command's disk images and offline export
        path must lie in (after links); None: anywhere (tests of the replication mechanics)."""
        self.folder = state_dir / "items"
        self.host = host
        self.wiring = wiring
        self.disk_roots = disk_roots
        self.export_roots = export_roots
        self.items: dict[uuid.UUID, ItemReplicator] = {}

    async def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.glob("*/item.json")):
            try:
                record = ItemRecord.model_validate_json(path.read_text())
            except ValueError as exc:
                log.error("item state unreadable", extra={"path": str(path), "error": str(exc)})
                continue
            await self._open(record)

    async def stop(self) -> None:
        for item in list(self.items.values()):
            await item.close()
        self.items = {}

    async def _open(self, record: ItemRecord) -> ItemReplicator:
        item = ItemReplicator(self.folder / str(record.item_id), record, self.host, self.wiring)
        await item.open()
        self.items[record.item_id] = item
        item.start()
        return item

    def get(self, item_id: uuid.UUID) -> ItemReplicator:
        item = self.items.get(item_id)
        if item is None:
            raise CommandFailed(f"item {item_id} is not replicated on this host")
        return item

    def by_vm(self, vm_id: str) -> ItemReplicator | None:
        return next(
            (i for i in self.items.values() if vm_id in (i.record.vm_id, i.record.vm_name)), None
        )

    async def enable(self, c: ReplicationEnableRequested) -> dict[str, Any]:
        existing = self.items.get(c.item_id)
        if existing is not None:
            return {"already_enabled": True, "next_cycle_seq": existing.record.next_seq}
        for spec in c.disks:
            _confine(spec.path, self.disk_roots, f"disk {spec.disk_id}")
            problem = await asyncio.to_thread(_disk_problem, spec)
            if problem is None and self.host.tracked(Path(spec.path)) is not None:
                problem = f"{spec.path} is already replicated"
            if problem is not None:
                raise CommandFailed(f"disk {spec.disk_id}: {problem}")
        if c.initial_replication is InitialReplication.OFFLINE and not c.export_path:
            raise CommandFailed("offline initial replication needs an export_path")
        if c.export_path:
            _confine(c.export_path, self.export_roots, "export_path")
        if c.initial_replication is InitialReplication.ONLINE_SCHEDULED and not c.scheduled_at:
            raise CommandFailed("scheduled initial replication needs scheduled_at")
        record = ItemRecord(
            item_id=c.item_id,
            vm_id=c.vm_id,
            vm_name=c.vm_name,
            disks=c.disks,
            copy_interval_seconds=c.copy_interval_seconds,
            compression=c.compression,
            app_consistent_interval_seconds=c.app_consistent_interval_seconds,
            initial_replication=c.initial_replication,
            scheduled_at=c.scheduled_at,
            export_path=c.export_path,
            next_seq=c.next_cycle_seq,
        )
        folder = self.folder / str(c.item_id)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "item.json", record.model_dump_json(indent=1).encode())
        await self._open(record)
        return {
            "initial_replication": c.initial_replication.value,
            "first_cycle_seq": c.next_cycle_seq,
        }

    async def disable(self, item_id: uuid.UUID) -> dict[str, Any]:
        item = self.items.pop(item_id, None)
        if item is None:
            shutil.rmtree(self.folder / str(item_id), ignore_errors=True)
            return {"was_enabled": False}
        await item.discard()
        return {"was_enabled": True}

    def pause(self, item_id: uuid.UUID, paused: bool) -> dict[str, Any]:
        item = self.get(item_id)
        item.record.paused = paused
        item.save()
        item.wake()
        return {"paused": paused}

    def resync_chunk(self, c: ResyncRequested) -> dict[str, Any]:
        item = self.get(c.item_id)
        known = {d.disk_id for d in item.disks}
        if c.disk_id not in known:
            raise CommandFailed(f"disk {c.disk_id} is not a disk of item {c.item_id}")
        if c.disk_count != len(known):
            raise CommandFailed(f"disk_count {c.disk_count} but the item has {len(known)} disks")
        if not store_resync_chunk(item.folder, c):
            return {"resync_id": str(c.resync_id), "complete": False}
        item.request_resync(c)
        return {"resync_id": str(c.resync_id), "complete": True, "cycle_seq": c.cycle_seq}

    def status(self) -> list[dict[str, Any]]:
        return [i.status() for i in self.items.values()]

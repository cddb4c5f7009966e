"""One protected item's replication loop: initial replication, then one delta cycle per copy
interval (sooner when at least `EARLY_CYCLE_BLOCKS` blocks changed: the interval is the longest
gap), resync by Merkle diff, the final cycle of a shutdown, pause / resume, faults.

One asyncio task per item runs its cycles in order (`cycle_shipping` ships one); commands only
change the record and wake it.

An item is in one `ReplicationPhase` at a time (item_record.py lists the moves allowed):
`initial` until its first full cycle (initial or resync) is out, then `replicating` (a delta
per interval), `resync_required` after a fault (nothing ships until a resync's full cycle),
`synced` after the final cycle of a shutdown (until the VM runs again). Pausing is the
operator's hold on top of the phase: a paused item keeps its phase and ships no deltas.

Enabled `seeded` (reverse replication: the target already holds an older copy of the disks),
an item ships no initial cycle and no deltas; the first `ResyncRequested` ships, as cycle
`cycle_seq`, only the blocks whose hashes differ from that copy (`resync/<resync_id>/` holds
the replica's hashes as they arrive: `resync_chunks`), and deltas follow from there (its
capture starts the journals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from services.host_agent.cycle_shipping import CycleShipper
from services.host_agent.cycles import CycleSink, FileSink, export_path
from services.host_agent.item_record import ItemRecord, ReplicationPhase
from services.host_agent.resync_chunks import load_replica_leaves
from services.host_agent.tracking import HostIO
from services.host_agent.wiring import CommandFailed, Wiring
from shared.merkle import BLOCK_SIZE
from shared.metrics import reason_label
from shared.schemas.agent import InitialReplication, ReplicationFaulted, ResyncRequested
from shared.schemas.replication import CycleKind

log = logging.getLogger(__name__)

FAULTS = Counter("dr_agent_replication_faults_total", "Items that need a resync", ["reason"])

CHANGE_LOG_LIMIT = 0.5  # of the disk size (docs/reference.md: resync when the log outgrows 50 %)
# A delta of this many distinct blocks (4 MiB) ships as soon as the previous cycle is done,
# without waiting for the copy interval's tick (the interval bounds the RPO; earlier is fine:
# more points only lower the RPO and the missed-cycles count).
EARLY_CYCLE_BLOCKS = 64
# An early cycle lets a write burst finish first (a pause of this long between writes), for
# at most EARLY_SETTLE_MAX: one cycle then carries the burst instead of its first 64 blocks,
# with the rest a cycle later.
EARLY_SETTLE_QUIET = 0.005
EARLY_SETTLE_MAX = 0.25


class ItemReplicator(CycleShipper):
    """One protected item: its disks, record and cycle loop."""

    def __init__(self, folder: Path, record: ItemRecord, host: HostIO, wiring: Wiring) -> None:
        super().__init__(folder, record, host, wiring)
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._due = 0.0
        self._resync: ResyncRequested | None = None
        self._final: list[asyncio.Future[dict[str, Any]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._early = False  # a big delta is waiting: ship it before the next tick
        self._last_write = 0.0  # time.monotonic() of the latest journaled write

    # ------------------------------------------------------------------ open / close

    async def open(self) -> None:
        await asyncio.to_thread(self._load)
        self._journal_gauge()

    async def close(self) -> None:
        """Clean stop: the loop ended, then the disks' tracking closed (`close_tracking`)."""
        await self._cancel()
        self.close_tracking()

    async def discard(self) -> None:
        """Disable: stop and forget the item's tracking state."""
        await self._cancel()
        self.forget_tracking()

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

"""A protected item's disks as this host tracks them: the shipped leaf hashes and journals
loaded at start, synced at a clean stop, dropped at disable; `item.json` saved.

Per item, `<state_dir>/items/<item_id>/`: `item.json` (the enable command's settings and the
progress: next cycle number, phase, journal epochs), the disks' journals and shipped leaf hashes
(see `tracking`), `open` while the agent runs. A journal that can't be trusted at start (lost,
or the host stopped uncleanly) leaves `fault_at_start` for the item's loop to report.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path

from prometheus_client import Gauge

from services.host_agent.item_record import ItemRecord, ReplicationPhase, disk_key, image_stat
from services.host_agent.tracking import (
    HostIO,
    Journal,
    JournalState,
    JournalUntrusted,
    TrackedDisk,
    boot_id,
    disk_blocks,
    load_leaves,
)
from services.host_agent.wiring import Wiring
from shared.files import write_atomic
from shared.merkle import MerkleTree
from shared.schemas.envelope import EventPayload

JOURNAL_RECORDS = Gauge("dr_agent_journal_records", "Unshipped journal records", ["item_id"])
LAST_CYCLE = Gauge(
    "dr_agent_last_cycle_timestamp_seconds", "When the last cycle was shipped", ["item_id"]
)


class TrackedItem:
    """One protected item's record and tracked disks (`ItemReplicator` adds its cycles)."""

    def __init__(self, folder: Path, record: ItemRecord, host: HostIO, wiring: Wiring) -> None:
        self.folder = folder
        self.record = record
        self.host = host
        self.wiring = wiring
        self.disks: list[TrackedDisk] = []
        self._scan: set[str] = set()  # disk keys written while the agent was off
        self.state = "starting"
        self._fault_at_start: str | None = None

    @property
    def item_id(self) -> uuid.UUID:
        return self.record.item_id

    def save(self) -> None:
        write_atomic(self.folder / "item.json", self.record.model_dump_json(indent=1).encode())

    async def publish(self, payload: EventPayload) -> None:
        await self.wiring.emit(payload)

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

    def close_tracking(self) -> None:
        """Clean stop: journals synced, image stats recorded, the `open` marker removed."""
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

    def forget_tracking(self) -> None:
        """Disable: forget the item's tracking state."""
        for disk in self.disks:
            self.host.untrack(disk)
            if disk.journal is not None:
                disk.journal.discard()
            disk.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        for gauge in (JOURNAL_RECORDS, LAST_CYCLE):
            with contextlib.suppress(KeyError):
                gauge.remove(str(self.item_id))

    def _journal_gauge(self) -> None:
        records = sum(d.journal.records for d in self.disks if d.journal is not None)
        JOURNAL_RECORDS.labels(str(self.item_id)).set(records)

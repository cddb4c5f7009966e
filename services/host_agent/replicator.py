"""Replication of protected items: every item this host protects (`ItemReplicator`, one
asyncio task each), enabled, disabled, paused and resynced by the agent's commands.

Per item, `<state_dir>/items/<item_id>/` (tracked_item.py lists what it holds); the item's
loop, phases and cycles: item_replicator.py and cycle_shipping.py.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.host_agent.item_record import ItemRecord
from services.host_agent.item_replicator import ItemReplicator
from services.host_agent.resync_chunks import store_resync_chunk
from services.host_agent.tracking import HostIO
from services.host_agent.wiring import CommandFailed, Wiring
from shared.files import OutsideRoots, confined, write_atomic
from shared.schemas.agent import (
    DiskSpec,
    InitialReplication,
    ReplicationEnableRequested,
    ResyncRequested,
)

log = logging.getLogger(__name__)


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

"""VMs created and deleted by commands (failover to this host, test-failover cleanup).

`VmCreateRequested`: the disk images are already in `<storage>/<vm_name>/` (written by the
replication service, handed over from the replica, or differencing disks over it); creating
the VM is writing its `vm.json` (id, sizes, NIC attachments, state) once every image is there
with the size the command says. `VmDeleteRequested`: the workload stops, any replication of the
VM on this host is forgotten, the folder goes, then the frozen views its differencing disks
held (a kill in between: the replica drops views no disk names).
Both are idempotent, so a command replayed after a crash (before its result was journaled)
ends in the same state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from pathlib import Path
from typing import Any

from services.host_agent import differencing
from services.host_agent.replica import SiteReplica
from services.host_agent.replicator import Replicator
from services.host_agent.vms import (
    NAME,
    VmDisk,
    VmFile,
    VmNic,
    VmNotFound,
    load_vm,
    save_vm,
    vm_dir,
)
from services.host_agent.wiring import CommandFailed
from services.host_agent.workload import Workloads
from shared.schemas.agent import VmCreateRequested, VmDeleteRequested
from shared.schemas.inventory import VmState

log = logging.getLogger(__name__)

DISK_FILE = re.compile(r"^[A-Za-z0-9._-]+\.(vhdx?|avhdx)$")


def _check_name(name: str) -> None:
    if not re.match(NAME, name):
        raise CommandFailed(
            f"'{name}' is not a usable VM name (letters, digits, '.', '_', '-'; up to 63)"
        )


def create_vm_from_disks(storage: Path, command: VmCreateRequested) -> tuple[VmFile, bool]:
    """The VM of the command, from the images in its folder; (vm, whether it existed)."""
    _check_name(command.vm_name)
    folder = vm_dir(storage, command.vm_name)
    try:
        existing: VmFile | None = load_vm(storage, command.vm_name)
    except VmNotFound:
        existing = None
    if existing is not None:
        if existing.id != command.vm_id:
            raise CommandFailed(
                f"a different VM (id {existing.id}) named '{command.vm_name}' already exists "
                f"on this host; delete it or choose another name"
            )
        return existing, True
    problems = []
    for disk in command.disks:
        if not DISK_FILE.fullmatch(disk.file):
            problems.append(
                f"disk {disk.disk_id}: '{disk.file}' is not a .vhdx/.vhd/.avhdx file name"
            )
            continue
        path = folder / disk.file
        if not path.is_file():
            problems.append(
                f"disk {disk.disk_id}: no image at {path} (materialise the recovery point there "
                "first)"
            )
        elif (size := path.stat().st_size) != disk.size_bytes:
            problems.append(
                f"disk {disk.disk_id}: image {path} is {size} bytes, the command says "
                f"{disk.size_bytes}"
            )
    if problems:
        raise CommandFailed("; ".join(problems))
    vm = VmFile(
        id=command.vm_id,
        name=command.vm_name,
        generation=command.generation,  # type: ignore[arg-type]  # 1 or 2 (schema checks)
        cpu=command.cpu_count,
        memory_mb=command.memory_mb,
        state=VmState.RUNNING if command.start else VmState.OFF,
        disks=[VmDisk(id=d.disk_id, file=d.file, size_bytes=d.size_bytes) for d in command.disks],
        nics=[VmNic.model_validate(n.model_dump(mode="json")) for n in command.nics],
    )
    save_vm(storage, vm)
    return vm, False


async def create_vm(storage: Path, command: VmCreateRequested) -> dict[str, Any]:
    vm, existed = await asyncio.to_thread(create_vm_from_disks, storage, command)
    log.info("VM created", extra={"vm": vm.name, "vm_id": vm.id, "already_existed": existed})
    return {"vm": vm.model_dump(mode="json"), "already_existed": existed}


def _items_of(replicator: Replicator, name: str, folder: Path) -> list[uuid.UUID]:
    """The items replicating the VM (by name, or a disk inside its folder)."""
    inside = folder.resolve()
    return [
        item_id
        for item_id, item in replicator.items.items()
        if item.record.vm_name == name
        or any(Path(d.path).resolve().is_relative_to(inside) for d in item.record.disks)
    ]


async def delete_vm(
    storage: Path,
    command: VmDeleteRequested,
    workloads: Workloads,
    replicator: Replicator,
    replica: SiteReplica,
) -> dict[str, Any]:
    """Stop the VM's workload, forget its replication here, delete its folder, then drop the
    frozen views its differencing disks held."""
    _check_name(command.vm_name)
    folder = vm_dir(storage, command.vm_name)
    if not folder.exists():
        return {"vm_name": command.vm_name, "deleted": False, "already_gone": True}
    workloads.stop(command.vm_name)
    forgotten = await asyncio.to_thread(_items_of, replicator, command.vm_name, folder)
    for item_id in forgotten:
        await replicator.disable(item_id)
    vm_id = None
    with contextlib.suppress(VmNotFound, ValueError):
        vm_id = (await asyncio.to_thread(load_vm, storage, command.vm_name)).id
    await asyncio.to_thread(differencing.delete_folder, replica, folder)
    log.info("VM deleted", extra={"vm": command.vm_name, "replication_forgotten": len(forgotten)})
    return {
        "vm_name": command.vm_name,
        "vm_id": vm_id,
        "deleted": True,
        "already_gone": False,
        "replication_forgotten": [str(i) for i in forgotten],
    }

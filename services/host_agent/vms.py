"""The host's VMs: one folder per VM in the storage folder, `<storage_dir>/<name>/vm.json` plus
one sparse image file per disk (`<disk>.vhdx`, the file's size is the disk's size), or for a
test failover's VM a differencing disk (`<disk>.avhdx`, services/host_agent/differencing.py).

`vm.json`: `{"id", "name", "generation", "cpu", "memory_mb", "state": "Running"|"Off",
"disks": [{"id", "file", "size_bytes"}], "nics": [{"nic_id", "network_id", "subnet", "ip_mode",
"ip_address"}]}`. The site provider reads the same folder (its
`FolderVmMeta` ignores the keys it doesn't know).
"""

from __future__ import annotations

import re
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.files import confined, write_atomic
from shared.schemas.inventory import VmState

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_SIZE = re.compile(r"^(\d+)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class VmNotFound(LookupError):
    pass


class VmDisk(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=100)
    file: str = Field(pattern=r"^[A-Za-z0-9._-]+\.(vhdx?|avhdx)$")
    size_bytes: int = Field(gt=0)


class VmNic(BaseModel):
    """A NIC attachment (`NicAttachment` of a VmCreateRequested); the site provider reads it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    nic_id: str = Field(min_length=1, max_length=100)
    network_id: str | None = None
    subnet: str | None = None
    ip_mode: Literal["static", "dhcp"] = "dhcp"
    ip_address: str | None = None


class VmFile(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=100)
    name: str = Field(pattern=NAME)
    generation: Literal[1, 2] = 2
    cpu: int = Field(default=2, ge=1, le=240)
    memory_mb: int = Field(default=4096, ge=32)
    state: VmState = VmState.RUNNING
    disks: list[VmDisk] = Field(default_factory=list, max_length=16)
    nics: list[VmNic] = Field(default_factory=list, max_length=64)


def parse_size(text: str) -> int:
    """`64MiB`, `1G`, `4096` -> bytes."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 64MiB, 1GiB, 65536)")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


def vm_dir(storage: Path, name: str) -> Path:
    return storage / name


def disk_path(storage: Path, vm: VmFile, disk: VmDisk) -> Path:
    return vm_dir(storage, vm.name) / disk.file


def save_vm(storage: Path, vm: VmFile) -> None:
    folder = vm_dir(storage, vm.name)
    write_atomic(folder / "vm.json", vm.model_dump_json(indent=2).encode())


def load_vm(storage: Path, name: str) -> VmFile:
    path = vm_dir(storage, name) / "vm.json"
    if not re.match(NAME, name) or not path.is_file():
        raise VmNotFound(f"no VM '{name}' in {storage}")
    return VmFile.model_validate_json(path.read_text())


def list_vms(storage: Path) -> list[VmFile]:
    if not storage.is_dir():
        return []
    return [
        VmFile.model_validate_json((d / "vm.json").read_text())
        for d in sorted(storage.iterdir())
        if (d / "vm.json").is_file()
    ]


def find_vm(storage: Path, vm_id: str) -> VmFile:
    """A VM by its id or folder name."""
    for vm in list_vms(storage):
        if vm_id in (vm.id, vm.name):
            return vm
    raise VmNotFound(f"no VM with id or name '{vm_id}' in {storage}")


def create_vm(
    storage: Path,
    name: str,
    disk_sizes: list[int],
    *,
    generation: Literal[1, 2] = 2,
    cpu: int = 2,
    memory_mb: int = 4096,
    vm_id: str | None = None,
) -> VmFile:
    """A new VM folder with sparse disk images (`disk0.vhdx`, `disk1.vhdx`, ...)."""
    if not disk_sizes or len(disk_sizes) > 16:
        raise ValueError("a VM has 1 to 16 disks")
    folder = vm_dir(storage, name)
    if folder.exists():
        raise FileExistsError(f"VM '{name}' already exists in {storage}")
    vm = VmFile(
        id=vm_id or str(uuid.uuid4()),
        name=name,
        generation=generation,
        cpu=cpu,
        memory_mb=memory_mb,
        disks=[
            VmDisk(id=f"disk{i}", file=f"disk{i}.vhdx", size_bytes=size)
            for i, size in enumerate(disk_sizes)
        ],
    )
    folder.mkdir(parents=True)
    for disk in vm.disks:
        with open(disk_path(storage, vm, disk), "wb") as fh:
            fh.truncate(disk.size_bytes)
    save_vm(storage, vm)
    return vm


def set_state(storage: Path, name: str, state: VmState) -> VmFile:
    vm = load_vm(storage, name).model_copy(update={"state": state})
    save_vm(storage, vm)
    return vm


def image_sizes(storage: Path, paths: Iterable[str]) -> dict[str, int | None]:
    """Each path's size if it is a regular file in `storage` (after following links, `..`
    applied), else None: missing, not a file, outside the storage, or not a path at all."""
    sizes: dict[str, int | None] = {}
    for path in paths:
        try:
            found = confined(path, [storage]).stat()
        except (OSError, ValueError):  # OutsideRoots is a ValueError
            sizes[path] = None
            continue
        sizes[path] = found.st_size if stat.S_ISREG(found.st_mode) else None
    return sizes

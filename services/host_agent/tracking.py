"""Change tracking of a protected disk: the journal of written block indexes, copy-on-write
snapshots that freeze a VM's disks at one instant, scan mode, and the shipped leaf hashes.

Journal (the analogue of Hyper-V's replica log), per disk, in segments
`<item dir>/<disk key>.<epoch>.jnl`: a 16-byte header (`DRJNL001` + epoch, u64 LE) then 8-byte
records (block index u32 LE, CRC-32 of epoch||index u32 LE). A write through the agent appends
its record *before* the data write (write-ahead). Each cycle capture seals the active segment
(fsync) and opens the next epoch; the sealed segments stay until their cycle is fully shipped,
so a restart (clean or kill -9) re-ships the union of every unshipped segment. The item's state
file records, per disk, the shipped epoch, the active epoch and each sealed segment's record
count. An item folder holds an `open` marker (the boot id) while the agent runs; at start an
`open` marker left behind means an unclean stop: a different boot id (host crash: unsynced
journal tail may be lost), a missing segment, a sealed segment of the wrong length, a bad CRC
or a torn record make the journal untrusted -> the item needs a resync.

Scan mode finds the changed blocks of any image by hashing its blocks against the leaf hashes
last shipped (`<disk key>.leaves`: 32 bytes per block, the Merkle leaves of the replica's state).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from services.host_agent import differencing
from shared.files import fsync_dir, write_atomic
from shared.merkle import BLOCK_SIZE, HASH_SIZE, MerkleTree, block_count, block_hash, read_blocks

MAGIC = b"DRJNL001"
HEADER = struct.Struct("<8sQ")
RECORD = struct.Struct("<II")


class JournalUntrusted(Exception):
    """The journal can't be trusted (lost or corrupt): the item needs a resync."""


class JournalState(BaseModel):
    """What the item's state file records about one disk's journal."""

    shipped_epoch: int = Field(default=0, ge=0)
    active_epoch: int = Field(default=1, ge=1)
    sealed: dict[int, int] = Field(default_factory=dict, description="epoch -> record count")


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _crc(epoch: int, index: int) -> int:
    return zlib.crc32(struct.pack("<QI", epoch, index))


def segment_path(folder: Path, key: str, epoch: int) -> Path:
    return folder / f"{key}.{epoch:012d}.jnl"


def segment_epochs(folder: Path, key: str) -> list[int]:
    return sorted(int(p.name.split(".")[1]) for p in folder.glob(f"{key}.*.jnl"))


def read_segment(path: Path, epoch: int) -> list[int]:
    """The block indexes recorded in a segment; raises `JournalUntrusted` if it is damaged."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise JournalUntrusted(f"journal segment {path.name} is missing") from None
    if len(raw) < HEADER.size or HEADER.unpack_from(raw) != (MAGIC, epoch):
        raise JournalUntrusted(f"journal segment {path.name} has a bad header")
    body = memoryview(raw)[HEADER.size :]
    if len(body) % RECORD.size:
        raise JournalUntrusted(f"journal segment {path.name} ends in a torn record")
    out = []
    for index, crc in RECORD.iter_unpack(body):
        if crc != _crc(epoch, index):
            raise JournalUntrusted(f"journal segment {path.name}: record checksum mismatch")
        out.append(index)
    return out


class Journal:
    """One disk's journal: the active segment (appended to) and the sealed, unshipped ones."""

    def __init__(self, folder: Path, key: str, blocks: int, state: JournalState) -> None:
        self.folder = folder
        self.key = key
        self.blocks = blocks
        self.state = state
        self.active: set[int] = set()
        self.pending: set[int] = set()
        self.records = 0  # log records not yet shipped (the "change log size")
        self._active_records = 0
        self._fd = -1

    @classmethod
    def create(cls, folder: Path, key: str, blocks: int, after_epoch: int = 0) -> Journal:
        """A fresh journal (old segments of this disk are deleted)."""
        for epoch in segment_epochs(folder, key):
            segment_path(folder, key, epoch).unlink()
        state = JournalState(shipped_epoch=after_epoch, active_epoch=after_epoch + 1)
        journal = cls(folder, key, blocks, state)
        journal._open_active(new=True)
        return journal

    @classmethod
    def recover(cls, folder: Path, key: str, blocks: int, state: JournalState) -> Journal:
        """Reopen after a restart; every unshipped segment must be there and intact."""
        epochs = [e for e in segment_epochs(folder, key) if e > state.shipped_epoch]
        expected = list(range(state.shipped_epoch + 1, (epochs[-1] if epochs else 0) + 1))
        if not epochs or epochs != expected or epochs[-1] < state.active_epoch:
            raise JournalUntrusted(
                f"journal of {key}: segments {epochs} but epochs "
                f"{state.shipped_epoch + 1}..{state.active_epoch} are unshipped"
            )
        journal = cls(folder, key, blocks, state.model_copy(deep=True))
        for epoch in epochs:
            indexes = read_segment(segment_path(folder, key, epoch), epoch)
            if epoch in state.sealed and len(indexes) != state.sealed[epoch]:
                raise JournalUntrusted(
                    f"journal of {key}: segment {epoch} has {len(indexes)} records, "
                    f"{state.sealed[epoch]} were sealed"
                )
            if any(i >= blocks for i in indexes):
                raise JournalUntrusted(f"journal of {key}: block index beyond the disk")
            journal.records += len(indexes)
            if epoch < epochs[-1]:
                journal.pending.update(indexes)
                journal.state.sealed[epoch] = len(indexes)
            else:
                journal.active.update(indexes)
                journal._active_records = len(indexes)
        journal.state.active_epoch = epochs[-1]
        for epoch in segment_epochs(folder, key):
            if epoch <= state.shipped_epoch:
                segment_path(folder, key, epoch).unlink(missing_ok=True)
        journal._open_active(new=False)
        return journal

    def _open_active(self, *, new: bool) -> None:
        path = segment_path(self.folder, self.key, self.state.active_epoch)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if new:
            os.write(self._fd, HEADER.pack(MAGIC, self.state.active_epoch))
            os.fsync(self._fd)
            fsync_dir(self.folder)

    def append(self, index: int) -> None:
        """Record a write of block `index` (before the data is written)."""
        os.write(self._fd, RECORD.pack(index, _crc(self.state.active_epoch, index)))
        self.active.add(index)
        self.records += 1
        self._active_records += 1

    def seal(self) -> set[int]:
        """Close the active segment (fsync) and start the next; returns every block changed
        since the last shipped cycle (the union of all unshipped segments)."""
        os.fsync(self._fd)
        os.close(self._fd)
        self.state.sealed[self.state.active_epoch] = self._active_records
        self.pending |= self.active
        self.active = set()
        self._active_records = 0
        self.state.active_epoch += 1
        self._open_active(new=True)
        return set(self.pending)

    def shipped(self) -> None:
        """The sealed segments' changes are out: forget them."""
        upto = self.state.active_epoch - 1
        for epoch in [e for e in self.state.sealed if e <= upto]:
            segment_path(self.folder, self.key, epoch).unlink(missing_ok=True)
            self.records -= self.state.sealed.pop(epoch)
        self.state.shipped_epoch = upto
        self.pending = set()

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Delete every segment (disable, or the journal was superseded by a resync)."""
        self.close()
        for epoch in segment_epochs(self.folder, self.key):
            segment_path(self.folder, self.key, epoch).unlink(missing_ok=True)


# ---------------------------------------------------------------- snapshots and block I/O


def read_block(fd: int, index: int, size_bytes: int, block_size: int = BLOCK_SIZE) -> bytes:
    length = min(block_size, size_bytes - index * block_size)
    data = os.pread(fd, length, index * block_size)
    return data if len(data) == length else data + bytes(length - len(data))


@dataclass
class Snapshot:
    """Copy-on-write view of one disk at the capture instant, for the blocks in `pending`: a
    write to a pending block first saves the old bytes to a spool file. Reads and writes take
    the VM lock, so a cycle reads its blocks while the workload goes on."""

    fd: int
    size_bytes: int
    pending: set[int]
    lock: threading.Lock
    spool_dir: Path
    saved: dict[int, int] = field(default_factory=dict)
    _spool: int = -1
    _spool_end: int = 0

    def preserve(self, index: int) -> None:
        """Called under the VM lock before block `index` is overwritten."""
        if index not in self.pending or index in self.saved:
            return
        if self._spool < 0:
            self._spool, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".cow")
            os.unlink(name)
        data = read_block(self.fd, index, self.size_bytes)
        os.pwrite(self._spool, data, self._spool_end)
        self.saved[index] = self._spool_end
        self._spool_end += len(data)

    def read(self, index: int) -> bytes:
        with self.lock:
            if index in self.saved:
                length = min(BLOCK_SIZE, self.size_bytes - index * BLOCK_SIZE)
                return os.pread(self._spool, length, self.saved[index])
            return read_block(self.fd, index, self.size_bytes)

    def release(self, indexes: Iterable[int]) -> None:
        with self.lock:
            for index in indexes:
                self.pending.discard(index)
                self.saved.pop(index, None)

    def close(self) -> None:
        with self.lock:
            self.pending = set()
            self.saved = {}
            if self._spool >= 0:
                os.close(self._spool)
                self._spool = -1


# ---------------------------------------------------------------- shipped leaf hashes


def load_leaves(path: Path, blocks: int) -> MerkleTree | None:
    """The tree of the last shipped state, or None if the file is missing or damaged."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) != blocks * HASH_SIZE:
        return None
    return MerkleTree.from_leaves(
        (raw[i : i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE)), blocks
    )


def save_leaves(path: Path, tree: MerkleTree, changed: Iterable[int] | None = None) -> None:
    """Persist the leaves: all of them (atomically), or only `changed` ones in place."""
    if changed is None or not path.exists():
        write_atomic(path, b"".join(tree.leaf_hashes()))
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        for index in changed:
            os.pwrite(fd, tree.leaf(index), index * HASH_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)


def scan_changes(path: Path, size_bytes: int, shipped: MerkleTree) -> list[int]:
    """Scan mode: the blocks of an image whose hash differs from the last shipped leaves."""
    with path.open("rb") as fh:
        return [
            index
            for index, data in read_blocks(fh, size_bytes)
            if index >= shipped.leaves or block_hash(data) != shipped.leaf(index)
        ]


def disk_blocks(size_bytes: int) -> int:
    return block_count(size_bytes, BLOCK_SIZE)


# ---------------------------------------------------------------- the host's block I/O


@dataclass
class TrackedDisk:
    """A protected disk: its image, journal, shipped tree and the snapshot being read."""

    disk_id: str
    key: str
    path: Path
    size_bytes: int
    tree: MerkleTree
    journal: Journal | None = None
    snapshot: Snapshot | None = None
    fd: int = -1
    on_write: Callable[[], None] | None = None  # told after each journaled write

    @property
    def blocks(self) -> int:
        return disk_blocks(self.size_bytes)

    def open(self) -> None:
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self.snapshot is not None:
            self.snapshot.close()
            self.snapshot = None
        if self.journal is not None:
            self.journal.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def before_write(self, index: int) -> None:
        """Under the VM lock, before block `index` is written: copy-on-write, then journal."""
        if self.snapshot is not None:
            self.snapshot.preserve(index)
        if self.journal is not None:
            self.journal.append(index)
            if self.on_write is not None:
                self.on_write()


class HostIO:
    """Every write the agent makes to a VM disk (its workload generator, our stand-in for
    guest I/O) goes through here: under the VM's lock, tracked disks journal the write and
    preserve snapshot blocks before the data lands."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._tracked: dict[Path, TrackedDisk] = {}
        self._fds: dict[Path, int] = {}

    def vm_lock(self, vm_name: str) -> threading.Lock:
        return self._locks.setdefault(vm_name, threading.Lock())

    def track(self, disk: TrackedDisk) -> None:
        self._tracked[disk.path.resolve()] = disk

    def untrack(self, disk: TrackedDisk) -> None:
        self._tracked.pop(disk.path.resolve(), None)

    def tracked(self, path: Path) -> TrackedDisk | None:
        return self._tracked.get(path.resolve())

    def write(self, vm_name: str, path: Path, index: int, data: bytes) -> None:
        real = path.resolve()
        if differencing.is_differencing(real):  # a test VM: the write stays in its overlay
            with self.vm_lock(vm_name):
                differencing.write_block(real, index, data, BLOCK_SIZE)
            return
        with self.vm_lock(vm_name):
            fd = self._fds.get(real)
            if fd is None:
                fd = self._fds[real] = os.open(real, os.O_WRONLY)
            tracked = self._tracked.get(real)
            if tracked is not None:
                tracked.before_write(index)
            os.pwrite(fd, data, index * BLOCK_SIZE)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class AgentRunning(Exception):
    pass


@contextlib.contextmanager
def agent_lock(state_dir: Path) -> Iterator[int]:
    """Held by a running agent for its lifetime: only one process owns the journals."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentRunning(
                f"an agent is running on {state_dir}: use its POST /v1/vms/{{name}}/writes"
            ) from None
        yield fd
    finally:
        os.close(fd)

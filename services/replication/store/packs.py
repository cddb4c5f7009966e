"""An item's block bytes: append-only pack files `packs/<n:08d>.pack` of records (magic,
SHA-256, length, bytes) and their in-memory index (docs/replica-store.md)."""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

from services.replication.store.layout import mkdir_durable
from shared.files import fsync_dir

PACK_RECORD = struct.Struct(">4s32sI")  # magic, SHA-256, length; then the block's bytes
_PACK_MAGIC = b"DRP1"
_PACK_FILE = re.compile(r"(\d{8})\.pack")
PACK_BYTES = 64 * 1024 * 1024  # a pack past this size is closed; the next batch begins one
PACK_COMPACT_BELOW = 0.75  # GC rewrites a pack whose live records are below this share of it
_IOV_MAX = 1024  # the most buffers one writev(2) takes (Linux's IOV_MAX)
_COMPACT_RECORDS = 256  # records read and re-appended at a time when a pack is compacted


def _write_all(fd: int, parts: list[bytes]) -> None:
    """`parts` written in order at the file's position, `_IOV_MAX` buffers per writev(2)."""
    for start in range(0, len(parts), _IOV_MAX):
        chunk = parts[start : start + _IOV_MAX]
        done = os.writev(fd, chunk)
        if done < sum(len(p) for p in chunk):  # a short write: the rest plainly
            view = memoryview(b"".join(chunk))[done:]
            while view:
                view = view[os.write(fd, view) :]


class Packs:
    """One item's block bytes: append-only pack files `packs/<n:08d>.pack` of records (magic,
    SHA-256, length, bytes), and an in-memory index sha256 hex -> (pack, offset, length) built
    from the record headers when the item is first used. A batch of new blocks is one append
    and one fdatasync; a pack past `PACK_BYTES` is closed and the next batch begins a new one.
    Callers hold the item's lock to append or collect; reads need no lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index: dict[str, tuple[int, int, int]] = {}
        self.sizes: dict[int, int] = {}  # pack -> bytes of whole records
        self._fd = -1
        self._current: int | None = None  # the pack being appended to
        self._last = 0  # the highest pack number used: numbers are never reused
        if folder.is_dir():
            found = (_PACK_FILE.fullmatch(p.name) for p in folder.iterdir())
            numbers = sorted(int(m.group(1)) for m in found if m)
            for n in numbers:
                self._load(n, newest=n == numbers[-1])
            self._last = max(numbers, default=0)

    def path(self, n: int) -> str:
        return f"{self.folder}/{n:08d}.pack"

    def _load(self, n: int, *, newest: bool) -> None:
        """Index pack `n`. The newest pack's records are hash-checked as well and the pack cut
        at its first bad one: only its tail can hold an append that a crash interrupted (one
        whose fdatasync never returned, so its batch was never acknowledged)."""
        path, good = self.path(n), 0
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            while good + PACK_RECORD.size <= size:
                fh.seek(good)
                magic, digest, length = PACK_RECORD.unpack(fh.read(PACK_RECORD.size))
                start = good + PACK_RECORD.size
                if magic != _PACK_MAGIC or start + length > size:
                    break
                if newest and hashlib.sha256(fh.read(length)).digest() != digest:
                    break
                self.index[digest.hex()] = (n, start, length)
                good = start + length
        if good < size and newest:
            with open(path, "r+b") as fh:
                fh.truncate(good)
                os.fdatasync(fh.fileno())
        self.sizes[n] = good

    def append(self, blocks: Sequence[tuple[str, bytes]]) -> None:
        """New blocks (sha256 hex, bytes), durable when this returns."""
        if self._current is None or self.sizes[self._current] >= PACK_BYTES:
            self._begin()
        assert self._current is not None
        n, start = self._current, self.sizes[self._current]
        parts: list[bytes] = []
        entries: list[tuple[str, tuple[int, int, int]]] = []
        offset = start
        for sha, data in blocks:
            parts.append(PACK_RECORD.pack(_PACK_MAGIC, bytes.fromhex(sha), len(data)))
            parts.append(data)
            offset += PACK_RECORD.size
            entries.append((sha, (n, offset, len(data))))
            offset += len(data)
        try:
            _write_all(self._fd, parts)
            os.fdatasync(self._fd)
        except BaseException:
            with suppress(OSError):  # no torn record may stay in front of later appends
                os.ftruncate(self._fd, start)
            raise
        self.sizes[n] = offset
        self.index.update(entries)

    def _begin(self) -> None:
        self.close()
        mkdir_durable(self.folder)
        n = self._last = self._last + 1
        self._fd = os.open(self.path(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        fsync_dir(self.folder)  # the pack's name
        self._current, self.sizes[n] = n, 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._current = -1, None

    def read(self, sha: str) -> bytes | None:
        """The stored bytes of a block (unverified), or None if it is not stored."""
        loc = self.index.get(sha)
        if loc is None:
            return None
        n, offset, length = loc
        try:
            fd = os.open(self.path(n), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def has(self, sha: str) -> bool:
        loc = self.index.get(sha)
        return loc is not None and os.path.exists(self.path(loc[0]))

    def touch(self, n: int) -> None:
        """A block of pack `n` was put again (a cycle in flight uses it): the pack is spared by
        GC until the next commit (packs modified after the latest commit are)."""
        with suppress(FileNotFoundError):
            os.utime(self.path(n))

    def collect(
        self,
        live: set[str],
        cutoff_ns: int,
        first_free: Callable[[], None],
        *,
        compact_below: float | None = None,
    ) -> int:
        """Delete the packs with no live record; rewrite those whose live records are below
        `compact_below` (default: `PACK_COMPACT_BELOW`) of them (the live ones appended anew,
        verified, then the pack deleted). Packs modified at or after `cutoff_ns` (the latest
        commit) and the one being appended to are left alone. Returns bytes freed."""
        if compact_below is None:
            compact_below = PACK_COMPACT_BELOW
        records: dict[int, list[tuple[str, int]]] = {}
        for sha, (n, _, length) in self.index.items():
            records.setdefault(n, []).append((sha, length))
        freed = 0
        for n in sorted(self.sizes):
            if n == self._current:
                continue
            try:
                if os.stat(self.path(n)).st_mtime_ns >= cutoff_ns:
                    continue
            except FileNotFoundError:
                pass
            keep = [(sha, length) for sha, length in records.get(n, []) if sha in live]
            kept = sum(PACK_RECORD.size + length for _, length in keep)
            if keep and kept >= compact_below * self.sizes[n]:
                continue
            for start in range(0, len(keep), _COMPACT_RECORDS):
                moved = [(sha, self.read(sha)) for sha, _ in keep[start : start + _COMPACT_RECORDS]]
                intact = [
                    (sha, data)
                    for sha, data in moved
                    if data is not None and hashlib.sha256(data).hexdigest() == sha
                ]
                if intact:  # (a corrupt one is left out: verify reports it missing)
                    self.append(intact)
            if not freed:
                first_free()
            with suppress(FileNotFoundError):
                os.unlink(self.path(n))
            for sha, _ in records.get(n, []):
                if self.index.get(sha, (0,))[0] == n:
                    del self.index[sha]
            freed += self.sizes.pop(n) - kept
        if freed:
            fsync_dir(self.folder)
        return freed

"""The replica store: the bytes of every retained recovery point, on the recovery site's disk.

The service keeps recovery-point metadata in PostgreSQL; this store owns the bytes and is the
durable truth of what a point contains. Blocks, leaves and roots are those of `shared.merkle`.

Layout under `root` (one root per recovery site); docs/replica-store.md has the full story:

    items/<item_id>/
      packs/<n:08d>.pack         append-only block records (magic, SHA-256, length, bytes): a
                                 batch of new blocks is one append + fdatasync; content-addressed
                                 through an in-memory index; all-zero blocks are never stored
      points/<seq:012d>.json     one manifest per retained recovery point: seq, kind,
                                 source_time, app_consistent, new_bytes, and per disk size_bytes,
                                 block_size, merkle_root, `changed` ([index, sha256] of that
                                 point only) and, when it differs, `delta` (what to apply on the
                                 previous retained point: `changed` plus a resized boundary
                                 block, or the folded changes of pruned points in between)
      base/<seq:012d>/           compacted full map after point `seq` (every older point was
        base.json                pruned): {"seq", "disks": [{disk_id, size_bytes, block_size,
        <n>.bin                  file}]}; <n>.bin = 32-byte leaf hashes in block order
      BASE                       {"seq": N}: which base/ folder is current (absent: empty base)
      PRUNE.json                 journal of a prune past its point of no return
      tmp/                       every temp file and folder; emptied by `recover`
    trash/                       items being deleted

The full map of a disk at point p = the base, then for each retained point up to p: resize the
leaf array to the point's size (truncate, or extend with zero-block leaves) and apply its delta.
Every other file is written to tmp/, fsynced, renamed into place, and its folder fsynced. A
manifest's mtime is its commit time (prune preserves it); GC spares packs modified after the
latest manifest, i.e. the blocks of the cycle in flight (like git's prune expiry), deletes dead
packs and compacts mostly dead ones.

The package's modules, one job each: `errors`, `manifest` (what a point is), `maps` (a disk's
leaves at a point), `layout` (paths and durable writes), `packs` (block bytes), `points`
(reading retained points), `commit` (a point's trees and deltas, checked), `prune` (folding
and the journal), `images` (seed, materialise, verify); this module holds the per-item locks,
the caches and the operations callers use.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from services.replication.store import commit, points, prune
from services.replication.store import images as _images
from services.replication.store.errors import (
    BlockHashMismatch,
    CorruptBlock,
    PointConflict,
    UnknownPoint,
)
from services.replication.store.layout import (
    Layout,
    dumps,
    mkdir_durable,
    read_json,
    write_synced,
)
from services.replication.store.manifest import (
    PointInfo,
    PointManifest,
    StoredPoint,
    VerifyResult,
    check_manifest,
)
from services.replication.store.maps import DiskMap, DiskState, Latest
from services.replication.store.packs import Packs
from shared.faults import crash_point
from shared.files import fsync_dir
from shared.merkle import BLOCK_SIZE, MerkleTree, zero_block_hash
from shared.schemas.replication import CycleKind

_ITEM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_hashes(blocks: Sequence[tuple[int | None, str, bytes]]) -> list[str]:
    """The SHA-256 (hex) of each (index, expected sha256 hex, bytes); BlockHashMismatch names
    the first block whose bytes are not what its hash says. Hashed in the caller's thread: a
    thread hand-off per 64 KiB block costs about what it would save on two CPUs."""
    actual = [hashlib.sha256(data).hexdigest() for _, _, data in blocks]
    for (index, expected, _), got in zip(blocks, actual, strict=True):
        if got != expected.lower():
            raise BlockHashMismatch(expected, got, index)
    return actual


class ReplicaStore:
    """Content-addressed blocks + per-point manifests + a compacted base, per protected item.

    Methods are synchronous and thread-safe (one lock per item); call them via
    `asyncio.to_thread`. Each item is recovered (an interrupted prune finished or rolled back,
    temp files removed) on its first use by this instance.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._items = self.root / "items"
        self._trash = self.root / "trash"
        mkdir_durable(self._items)
        shutil.rmtree(self._trash, ignore_errors=True)  # deletions a crash interrupted
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._ready: set[str] = set()
        self._pins: dict[str, int] = {}
        self._latest: dict[str, Latest] = {}
        self._packs: dict[str, Packs] = {}  # an item's packs, loaded on its first use
        self._fresh: dict[str, dict[str, int]] = {}  # blocks written since the item's last commit

    def close(self) -> None:
        """Close the packs being appended to."""
        for packs in list(self._packs.values()):
            packs.close()

    # ------------------------------------------------------------------ locking and recovery

    @contextmanager
    def _locked(self, item_id: str, *, lazy_recover: bool = True) -> Iterator[Layout]:
        item = str(item_id)
        if not _ITEM_ID.fullmatch(item):
            raise ValueError(f"item id {item!r} is not a safe folder name")
        with self._guard:
            lock = self._locks.setdefault(item, threading.RLock())
        with lock:
            layout = Layout(self._items / item)
            if lazy_recover and item not in self._ready:
                self._recover(item, layout)
            yield layout

    def recover(self, item_id: str) -> None:
        """Finish (past its journal) or roll back (before it) an interrupted prune, and remove
        temp files. Idempotent; also runs lazily on an item's first use."""
        with self._locked(item_id, lazy_recover=False) as layout:
            self._recover(layout.dir.name, layout)

    def _recover(self, item: str, layout: Layout) -> None:
        self._latest.pop(item, None)
        if item in self._packs:
            self._packs.pop(item).close()
        self._packs[item] = Packs(layout.packs)
        if layout.dir.is_dir():
            if layout.journal.exists():
                self._roll_forward(item, layout, read_json(layout.journal))
            for staged in layout.points.glob("*.json.next"):
                staged.unlink()
            shutil.rmtree(layout.tmp, ignore_errors=True)
            base_seq = points.base_seq(layout)
            if layout.base.is_dir():
                for folder in layout.base.iterdir():
                    if folder.name != f"{base_seq:012d}":
                        shutil.rmtree(folder)
            for seq in points.seqs_above(layout, -1):
                if seq <= base_seq:  # a pruned point's file that came back after a crash
                    layout.point(seq).unlink()
        self._ready.add(item)

    @contextmanager
    def _reading(
        self, item_id: str, seq: int
    ) -> Iterator[tuple[Layout, StoredPoint, dict[str, DiskMap]]]:
        """The maps of point `seq`, with the item's blocks pinned (GC waits) but not locked."""
        with self._locked(item_id) as layout:
            stored = points.read_point(layout, seq)
            maps = self._maps_at(layout, seq)
            with self._guard:
                self._pins[str(item_id)] = self._pins.get(str(item_id), 0) + 1
        try:
            yield layout, stored, maps
        finally:
            with self._guard:
                self._pins[str(item_id)] -= 1

    # ------------------------------------------------------------------------------ blocks

    def put_block(
        self, item_id: str, sha256_hex: str, data: bytes, *, index: int | None = None
    ) -> bool:
        """Store one block (verified, durable before returning). True if new bytes were
        written; False for a block already stored or an all-zero block."""
        return self.put_blocks(item_id, [(index, sha256_hex, data)]) == 1

    def put_blocks(self, item_id: str, blocks: Sequence[tuple[int | None, str, bytes]]) -> int:
        """Store a batch of (index, sha256 hex, bytes); every hash is checked before anything
        is written. Same guarantees as `put_block`: when it returns, every new block is durable
        (appended to the item's current pack, one fdatasync for the batch). Returns how many
        blocks were newly written."""
        actual = check_hashes(blocks)
        todo = {
            sha: data
            for (_, _, data), sha in zip(blocks, actual, strict=True)
            if sha != zero_block_hash(len(data)).hex()
        }
        if not todo:
            return 0
        with self._locked(item_id) as layout:
            return self._store(layout, todo)

    def _store(self, layout: Layout, blocks: Mapping[str, bytes]) -> int:
        """Append the blocks not stored yet (verified by the caller); the stored ones are
        touched (GC spares them until the next commit). Returns how many were new."""
        packs = self._packs[layout.dir.name]
        new = []
        touched: set[int] = set()
        for sha, data in blocks.items():
            loc = packs.index.get(sha)
            if loc is not None and loc[2] == len(data) and packs.has(sha):
                touched.add(loc[0])
            else:  # (also when its pack is gone: stored again rather than missing forever)
                new.append((sha, data))
        for n in touched:  # once per pack, not per block
            packs.touch(n)
        if new:
            packs.append(new)
            fresh = self._fresh.setdefault(layout.dir.name, {})
            fresh.update((sha, len(data)) for sha, data in new)
        return len(new)

    # ------------------------------------------------------------------------------ reading

    def _maps_at(self, layout: Layout, seq: int) -> dict[str, DiskMap]:
        latest = self._latest.get(layout.dir.name)
        if latest is not None and latest.seq == seq:
            return {
                d: DiskMap.of_tree(s.tree, s.size_bytes, s.block_size)
                for d, s in latest.disks.items()
            }
        return points.replay(layout, seq)

    def _latest_state(self, layout: Layout) -> Latest:
        item = layout.dir.name
        if item not in self._latest:
            seqs = points.point_seqs(layout)
            if not seqs:
                self._latest[item] = Latest(None, {})
            else:
                maps = self._maps_at(layout, seqs[-1])
                disks = {
                    d: DiskState(m.size_bytes, m.block_size, m.tree()) for d, m in maps.items()
                }
                self._latest[item] = Latest(seqs[-1], disks)
        return self._latest[item]

    def read_blocks(self, item_id: str, blocks: Iterable[tuple[str, int, str]]) -> dict[str, bytes]:
        """The stored bytes of `blocks` ((disk id, index, SHA-256 hex) each) by SHA-256, each
        re-checked against its hash (`CorruptBlock`); a block not stored (all-zero blocks
        never are) is not in the answer."""
        out: dict[str, bytes] = {}
        with self._locked(item_id) as layout:
            packs = self._packs[layout.dir.name]
            for disk_id, index, sha in blocks:
                if sha in out:
                    continue
                data = packs.read(sha)
                if data is None:
                    continue
                actual = hashlib.sha256(data).hexdigest()
                if actual != sha:
                    raise CorruptBlock(disk_id, index, sha, actual)
                out[sha] = data
        return out

    def latest_seq(self, item_id: str) -> int | None:
        with self._locked(item_id) as layout:
            seqs = points.point_seqs(layout)
            return seqs[-1] if seqs else None

    def points(self, item_id: str) -> list[PointInfo]:
        with self._locked(item_id) as layout:
            infos = []
            for seq in points.point_seqs(layout):
                stored = points.read_point(layout, seq)
                m = stored.manifest
                infos.append(
                    PointInfo(
                        seq=m.seq,
                        source_time=m.source_time,
                        kind=m.kind,
                        app_consistent=m.app_consistent,
                        changed_blocks=sum(len(d.changed) for d in m.disks),
                        new_bytes=stored.new_bytes,
                    )
                )
            return infos

    def disk_tree(self, item_id: str, disk_id: str, seq: int | None = None) -> MerkleTree:
        """The Merkle tree of a disk at a point (default: the latest); a copy the caller owns."""
        with self._locked(item_id) as layout:
            latest = self._latest_state(layout)
            if latest.seq is None:
                raise UnknownPoint(f"item {item_id} has no recovery point")
            if seq is None or seq == latest.seq:
                if disk_id not in latest.disks:
                    raise UnknownPoint(f"disk {disk_id} is not in point {latest.seq}")
                return latest.disks[disk_id].tree.copy()
            maps = self._maps_at(layout, seq)
            if disk_id not in maps:
                raise UnknownPoint(f"disk {disk_id} is not in point {seq}")
            return maps[disk_id].tree()

    def leaf_hashes(self, item_id: str, disk_id: str, seq: int | None = None) -> list[bytes]:
        return list(self.disk_tree(item_id, disk_id, seq).leaf_hashes())

    # ------------------------------------------------------------------------------ commit

    def commit_point(self, item_id: str, manifest: PointManifest) -> None:
        """Commit a recovery point: every referenced block stored, every disk's root equal to
        the manifest's, manifest durable before returning. Same seq + same content: no-op."""
        check_manifest(manifest)
        with self._locked(item_id) as layout:
            item = layout.dir.name
            if layout.point(manifest.seq).exists():
                stored = points.read_point(layout, manifest.seq)
                if stored.manifest.to_json() == manifest.to_json():
                    return
                raise PointConflict(f"point {manifest.seq} is committed with other content")
            latest = self._latest_state(layout)
            if latest.seq is not None and manifest.seq <= latest.seq:
                raise PointConflict(f"point {manifest.seq} is older than the latest {latest.seq}")
            try:
                disks, deltas = commit.next_disks(
                    self._packs[item], latest, manifest, lambda blocks: self._store(layout, blocks)
                )
                fresh = self._fresh.get(item, {})
                hashes = {sha for delta in deltas.values() for _, sha in delta}
                stored = StoredPoint(manifest, deltas, sum(fresh.get(sha, 0) for sha in hashes))
                mkdir_durable(layout.points)
                mkdir_durable(layout.tmp)
                tmp = layout.temp("point")
                write_synced(tmp, dumps(stored.to_json()))
                crash_point("store.commit.staged")
                os.replace(tmp, layout.point(manifest.seq))
                crash_point("store.commit.renamed")
                fsync_dir(layout.points)
            except BaseException:
                self._latest.pop(item, None)  # the cached trees may hold half of this point
                raise
            self._latest[item] = Latest(manifest.seq, disks)
            self._fresh.pop(item, None)

    # ------------------------------------------------------------------------------ seeding

    def seed_from_images(
        self,
        item_id: str,
        seq: int,
        images: Mapping[str, Path],
        source_time: datetime,
        *,
        kind: str = CycleKind.INITIAL.value,
        block_size: int = BLOCK_SIZE,
        batch_blocks: int = 256,
    ) -> PointManifest:
        """Commit point `seq` of an item from disk image files already on this machine (reverse
        replication reuses the old primary's disks): every block hashed, non-zero blocks
        stored, roots computed. Re-seeding with the same images and arguments is a no-op; the
        source then only has to send the blocks whose hashes differ (resync)."""
        if not images:
            raise ValueError("seeding needs at least one disk image")
        disks = _images.seed_disks(
            images, block_size, batch_blocks, lambda batch: self.put_blocks(item_id, batch)
        )
        manifest = PointManifest(seq, kind, source_time, False, disks)
        self.commit_point(item_id, manifest)
        return manifest

    # -------------------------------------------------------------------------- materialise

    def materialise(
        self, item_id: str, seq: int, disk_id: str, out_path: Path, *, verify: bool = True
    ) -> str:
        """Write the disk image of point `seq` to `out_path` (exact size, zero blocks as holes,
        fsynced, renamed into place); returns the SHA-256 hex of the whole image. Streams block
        by block (memory: a read-ahead window). With `verify`, each block read is checked
        against its leaf (CorruptBlock otherwise)."""
        with self._reading(item_id, seq) as (layout, _, maps):
            if disk_id not in maps:
                raise UnknownPoint(f"disk {disk_id} is not in point {seq}")
            packs = self._packs[layout.dir.name]
            return _images.write_image(packs, disk_id, maps[disk_id], Path(out_path), verify)

    def verify_point(self, item_id: str, seq: int) -> VerifyResult:
        """Re-read and re-hash every block the point references and recompute each
        disk's Merkle root from what is actually on disk."""
        with self._reading(item_id, seq) as (layout, stored, maps):
            disks = _images.verify_disks(self._packs[layout.dir.name], stored, maps)
        return VerifyResult(str(item_id), seq, disks)

    # ------------------------------------------------------------------------------- prune

    def prune(self, item_id: str, keep: Iterable[int], *, truncate: bool = False) -> list[int]:
        """Remove every point not in `keep` (which must hold the latest), folding the ones
        older than the oldest kept point into the base and the others into the next kept
        point, then free unreferenced blocks. Returns the removed seqs.

        `truncate` (a committed failover: no cycle is in flight and none will come) also
        removes the points after the latest kept one, and frees every unreferenced block
        however recent.

        Steps, each atomic and durable before the next (crash points between them): new base
        written under a new name; rewritten manifests staged as `.next`; the journal
        PRUNE.json written (point of no return: before it `recover` rolls back, after it rolls
        forward); BASE switched; `.next` renamed over; removed manifests deleted; old base
        deleted; unreferenced blocks swept; journal removed."""
        keep = set(keep)
        with self._locked(item_id) as layout:
            seqs = points.point_seqs(layout)
            if not seqs:
                return []
            if not keep & set(seqs):
                raise ValueError("prune must keep at least one retained point")
            if seqs[-1] not in keep and not truncate:
                raise ValueError(f"prune must keep the latest point {seqs[-1]}")
            removed = [s for s in seqs if s not in keep]
            if not removed:
                return []
            try:
                journal = prune.stage(layout, seqs, keep)
                journal["truncate"] = seqs[-1] not in keep
                crash_point("store.prune.staged")
                prune.write_journal(layout, journal)
                crash_point("store.prune.journaled")
                self._roll_forward(layout.dir.name, layout, journal)
            except BaseException:
                self._ready.discard(layout.dir.name)  # next use recovers
                self._latest.pop(layout.dir.name, None)
                raise
            if journal["truncate"]:
                self._latest.pop(layout.dir.name, None)
                self._fresh.pop(layout.dir.name, None)
            return removed

    def _roll_forward(self, item: str, layout: Layout, journal: Mapping[str, Any]) -> None:
        prune.roll_forward(
            layout, journal, lambda spare: self._collect_garbage(item, layout, spare_recent=spare)
        )

    def _collect_garbage(self, item: str, layout: Layout, *, spare_recent: bool = True) -> int:
        """Free unreferenced blocks (`prune.collect_garbage`) unless a materialise or verify
        is reading the item (the next prune frees them then). Returns bytes freed."""
        with self._guard:
            if self._pins.get(item):
                return 0
        return prune.collect_garbage(layout, self._packs[item], spare_recent=spare_recent)

    # ------------------------------------------------------------------------------ sizes

    def delete_item(self, item_id: str) -> None:
        """Remove an item and all its points and blocks (moved to trash/ first: atomic)."""
        with self._locked(item_id) as layout:
            self._packs[layout.dir.name].close()
            if layout.dir.exists():
                mkdir_durable(self._trash)
                doomed = self._trash / f"{layout.dir.name}.{uuid.uuid4().hex[:8]}"
                os.replace(layout.dir, doomed)
                fsync_dir(self._items)
                shutil.rmtree(doomed, ignore_errors=True)
            self._latest.pop(layout.dir.name, None)
            self._fresh.pop(layout.dir.name, None)
            self._packs[layout.dir.name] = Packs(layout.packs)

    def item_bytes(self, item_id: str) -> int:
        """Bytes of the item's pack files (blocks; garbage until GC frees it)."""
        with self._locked(item_id) as layout:
            return self._block_bytes(layout)

    @staticmethod
    def _block_bytes(layout: Layout) -> int:
        total = 0
        for root, _, files in os.walk(layout.packs):  # tolerates files swept meanwhile
            for name in files:
                with suppress(FileNotFoundError):
                    total += os.stat(os.path.join(root, name)).st_size
        return total

    def total_bytes(self) -> int:
        """Bytes of the pack files of every item (not locked: a moment's approximation)."""
        return sum(self._block_bytes(Layout(d)) for d in self._items.iterdir() if d.is_dir())

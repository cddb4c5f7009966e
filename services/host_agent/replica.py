"""The replica an item keeps at the recovery site: one image per protected disk at the latest
applied recovery point (HEAD), plus an undo journal of what each retained point overwrote, so
the replica can return to any retained point by rewriting only the blocks changed since.

Layout, formats and the crash-safety argument: docs/replica-store.md ("Replica at the recovery
site"); the folder and its records: replica_format.py. This module sequences the operations
(seed, stage, apply, roll back, freeze a view, prune, delete, recover); the images are written
by replica_images.py (copied from image files on this host by replica_seed.py), the frozen
views read by replica_views.py, the Merkle trees kept by replica_trees.py.

Every step that changes what a reader sees is durable before the next (fdatasync/fsync, atomic
renames, folder fsync), with a `crash_point` after it; `recover(item)` finishes what a kill -9
left. One `SiteReplica` per process owns its root; calls on one item are serialised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from services.host_agent.replica_format import (
    BlockHashMismatch,
    DiskState,
    ItemFiles,
    Point,
    ReplicaError,
    RootMismatch,
    latest_staged,
    read_undo,
    staged_record,
    undo_prev,
)
from services.host_agent.replica_images import previous_point, restore, write_point, write_undo
from services.host_agent.replica_seed import (
    SeedDisk,
    check_source,
    copied,
    copy_image,
    move_into_place,
    read_seed_record,
    seed_record,
)
from services.host_agent.replica_trees import LeafTrees
from services.host_agent.replica_views import VIEW_ID, FrozenViews, view_seqs
from shared.faults import crash_point
from shared.files import fsync_dir, write_atomic
from shared.merkle import HASH_SIZE, block_count, block_hash

_IO_CHUNK = 1 << 20


class SiteReplica:
    """The replicas of the items a recovery host holds, under `root` (the agent's own)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, threading.RLock] = {}
        self._recovered: set[str] = set()
        self._trees = LeafTrees()
        self._views = FrozenViews(self._trees)

    # ------------------------------------------------------------------ basics

    def _lock(self, item: str) -> threading.RLock:
        return self._locks.setdefault(item, threading.RLock())

    def item_lock(self, item: str) -> threading.RLock:
        """Held by every call on `item`: a caller that must do more under it (create a view's
        owners right after freezing it) takes it around both."""
        return self._lock(item)

    def files(self, item: str) -> ItemFiles:
        if not item or "/" in item or item.startswith("."):
            raise ReplicaError(f"bad item id {item!r}")
        return ItemFiles(self.root / "replica" / item)

    def _open(self, item: str) -> ItemFiles:
        f = self.files(item)
        if item not in self._recovered:
            self._recover(item, f)
            self._recovered.add(item)
        return f

    def head(self, item: str) -> Point:
        """The point the images are at (seq 0, no disks: nothing applied yet)."""
        with self._lock(item):
            return self._open(item).read_head()

    def image_path(self, item: str, disk_id: str) -> Path:
        return self.files(item).image(disk_id)

    def retained(self, item: str) -> list[int]:
        """Points the replica can return to: HEAD and every point an undo record reaches."""
        with self._lock(item):
            f = self._open(item)
            head = f.read_head().seq
            undos = set(f.undo_seqs())
            # a point is reachable when the undo records from HEAD back to it are present:
            # each returns to the point before it (seq-1, or older for a catch-up point)
            reachable = [head] if head else []
            at = head
            while at in undos:
                at = undo_prev(f.undo_of(at))
                if at <= 0:
                    break
                reachable.append(at)
            return sorted(reachable)

    def roots(self, item: str) -> dict[str, str]:
        """The Merkle roots of the images, computed from their leaves."""
        with self._lock(item):
            f = self._open(item)
            return self._trees.roots(item, f, f.read_head().disks)

    # ------------------------------------------------------------------ staging

    def stage_blocks(
        self, item: str, seq: int, blocks: Iterable[tuple[str, int, bytes, bytes]]
    ) -> int:
        """Append blocks (disk id, index, SHA-256, bytes) of point `seq`, each checked against
        its hash, in one write and one fdatasync (an all-zero block as a record without its
        bytes). Returns how many were staged."""
        records = []
        for disk_id, index, sha, data in blocks:
            if block_hash(data) != sha:
                raise BlockHashMismatch(
                    f"block {index} of disk {disk_id}: SHA-256 {block_hash(data).hex()} is not "
                    f"the shipped {sha.hex()}"
                )
            records.append(staged_record(disk_id, index, sha, data))
        if not records:
            return 0
        with self._lock(item):
            f = self._open(item)
            if seq <= f.read_head().seq:
                return 0  # already applied (a re-delivered record)
            f.staged.mkdir(parents=True, exist_ok=True)
            path = f.staged_blocks(seq)
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, b"".join(records))
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(f.staged)
        return len(records)

    def stage_point(self, item: str, point: Point) -> None:
        """The point to apply (each disk's size, block size and the source's root)."""
        with self._lock(item):
            f = self._open(item)
            f.staged.mkdir(parents=True, exist_ok=True)
            write_atomic(f.staged_point(point.seq), json.dumps(point.to_json()).encode())
        crash_point("replica.apply.staged")

    @staticmethod
    def _unstage(f: ItemFiles, up_to: int) -> None:
        if not f.staged.is_dir():
            return
        for path in f.staged.iterdir():
            if path.name[:12].isdigit() and int(path.name[:12]) <= up_to:
                path.unlink(missing_ok=True)
        fsync_dir(f.staged)

    # ------------------------------------------------------------------ seeding

    def seed(self, item: str, seq: int, request: str, disks: list[SeedDisk]) -> Point:
        """Start the item's replica at point `seq` from image files on this host: byte copies,
        each disk's leaves computed while copying. Returns HEAD. Idempotent: the same seed
        again (same request, point and images) returns HEAD without copying; a replica at
        another point or seeded otherwise is refused. Re-run after a kill, it goes on from the
        disks not yet copied completely.

        1. `replica.seed.started` — `SEED.json` names the request and its images; anything
           left of another seed that never finished is gone.
        2. `replica.seed.disk_copied` (each disk) — the image copied into `seeding/` and its
           leaves written, both fdatasync'ed; the leaves renamed into place last.
        3. `replica.seed.images_moved` — the images, then their leaves, renamed into
           `disks/` (folder fsync'ed).
        4. `replica.seed.head_moved` — `HEAD.json` names point `seq` with the roots of the
           leaves: the replica exists from here on.
        5. `seeding/` removed (by `recover` if a kill came first)."""
        record = seed_record(request, seq, disks)
        with self._lock(item):
            f = self._open(item)
            head = f.read_head()
            if head.seq:
                if self.seeded(item, seq, request, disks) is not None:
                    return head
                raise ReplicaError(
                    f"the replica of item {item} is at point {head.seq}, not seeded at point "
                    f"{seq} from these images (a seed starts an item that has no replica)"
                )
            fresh = read_seed_record(f) != record
            for disk in disks:
                if fresh or not copied(f, disk.disk_id):
                    check_source(disk)  # every image to copy, before anything is written
            if fresh:
                for folder in (f.seeding, f.disks):
                    shutil.rmtree(folder, ignore_errors=True)
                self._trees.forget(item)
                f.root.mkdir(parents=True, exist_ok=True)
                write_atomic(f.seed, json.dumps(record).encode())
                crash_point("replica.seed.started")
            f.seeding.mkdir(exist_ok=True)
            f.disks.mkdir(exist_ok=True)
            for disk in disks:
                if not copied(f, disk.disk_id):
                    self._trees.keep(item, disk.disk_id, copy_image(f, disk))
                    crash_point("replica.seed.disk_copied")
            for disk in disks:
                move_into_place(f, disk.disk_id)
            fsync_dir(f.disks)
            fsync_dir(f.seeding)
            crash_point("replica.seed.images_moved")
            sized = tuple(DiskState(d.disk_id, d.size_bytes, d.block_size, "") for d in disks)
            roots = self._trees.roots(item, f, sized)
            point = Point(seq, tuple(replace(d, merkle_root=roots[d.disk_id]) for d in sized))
            write_atomic(f.head, json.dumps(point.to_json()).encode())
            crash_point("replica.seed.head_moved")
            shutil.rmtree(f.seeding)
            fsync_dir(f.root)
            return point

    def seeded(self, item: str, seq: int, request: str, disks: list[SeedDisk]) -> Point | None:
        """HEAD when the replica is at point `seq` seeded by that request from those images
        (nothing applied since), else None."""
        with self._lock(item):
            f = self._open(item)
            head = f.read_head()
            if head.seq != seq or read_seed_record(f) != seed_record(request, seq, disks):
                return None
            return head

    def leaves(self, item: str, disk_id: str, first: int, count: int) -> bytes:
        """HEAD's leaf hashes of blocks first..first+count-1 of a disk (32 bytes each; fewer
        past the disk's end)."""
        with self._lock(item):
            f = self._open(item)
            disk = f.read_head().disk(disk_id)
            if disk is None:
                raise ReplicaError(f"disk {disk_id} is not in the replica of item {item}")
            count = max(0, min(count, block_count(disk.size_bytes, disk.block_size) - first))
            with f.leaves(disk_id).open("rb") as lv:
                lv.seek(first * HASH_SIZE)
                return lv.read(count * HASH_SIZE)

    # ------------------------------------------------------------------ apply, rollback

    def apply(self, item: str, seq: int, base: int | None = None) -> Point:
        """Bring the images from HEAD (`base`, by default seq-1) to the staged point `seq`;
        returns the new HEAD. A `base` older than seq-1 is a catch-up: the replica missed the
        points between, and `seq`'s blocks are every block that differs from `base` (its undo
        record returns to `base`). Idempotent: a point already applied returns HEAD. The roots
        are checked against the point's (RootMismatch: the point is undone, HEAD stays)."""
        with self._lock(item):
            f = self._open(item)
            head = f.read_head()
            if seq <= head.seq:
                return head
            if head.seq != (seq - 1 if base is None else base):
                raise ReplicaError(f"point {seq} cannot follow point {head.seq}")
            try:
                point = Point.from_json(json.loads(f.staged_point(seq).read_bytes()))
            except FileNotFoundError:
                raise ReplicaError(f"point {seq} is not staged") from None
            missing = [d.disk_id for d in head.disks if point.disk(d.disk_id) is None]
            if missing:
                raise ReplicaError(f"point {seq} drops disk(s) {missing}: not supported")
            blocks = latest_staged(f.staged_blocks(seq))
            rerun = f.undo_of(seq).exists()  # rolled forward after a kill
            if not rerun:
                write_undo(f, head, point, blocks)
            crash_point("replica.apply.undo_written")
            got = write_point(
                self._trees,
                item,
                f,
                head,
                point,
                blocks,
                f.staged_blocks(seq),
                trust_leaves=not rerun,
            )
            crash_point("replica.apply.blocks_written")
            if got != point.roots():
                restore(self._trees, item, f, seq)
                os.unlink(f.undo_of(seq))
                fsync_dir(f.undo)
                raise RootMismatch(seq, got, point.roots())
            write_atomic(f.head, json.dumps(point.to_json()).encode())
            crash_point("replica.apply.head_moved")
            self._unstage(f, seq)
            crash_point("replica.apply.unstaged")
            return point

    def rollback(self, item: str, seq: int) -> Point:
        """Return the images to retained point `seq` (dropping every later point), rewriting
        only the blocks changed since. Returns the new HEAD."""
        with self._lock(item):
            f = self._open(item)
            head = f.read_head()
            if seq == head.seq:
                return head
            if seq not in self.retained(item) or seq > head.seq:
                raise ReplicaError(f"point {seq} is not retained here (HEAD {head.seq})")
            pinned = [v for v in view_seqs(f).values() if v > seq]
            if pinned:
                raise ReplicaError(f"frozen views of points {pinned} need the later points")
            write_atomic(f.rollback, json.dumps({"to": seq}).encode())
            crash_point("replica.undo.started")
            return self._roll_back(item, f, seq)

    def _roll_back(self, item: str, f: ItemFiles, to: int) -> Point:
        head = f.read_head()
        self._views.forget(item)  # their records above `to` go
        while head.seq > to:
            undo = read_undo(f.undo_of(head.seq))
            restore(self._trees, item, f, head.seq)
            crash_point("replica.undo.blocks_restored")
            previous = previous_point(head, undo)
            roots = self._trees.roots(item, f, previous.disks)
            head = Point(
                previous.seq,
                tuple(
                    DiskState(d.disk_id, d.size_bytes, d.block_size, roots[d.disk_id])
                    for d in previous.disks
                ),
            )
            write_atomic(f.head, json.dumps(head.to_json()).encode())
            crash_point("replica.undo.head_moved")
            os.unlink(f.undo_of(undo.seq))
            fsync_dir(f.undo)
            crash_point("replica.undo.dropped")
        f.rollback.unlink(missing_ok=True)
        fsync_dir(f.root)
        return head

    # ------------------------------------------------------------------ views, retention

    def views(self, item: str) -> dict[str, int]:
        """The item's frozen views (those an owner keeps): view id -> point."""
        with self._lock(item):
            f = self._open(item)
            self._views.sweep(item, f)
            return view_seqs(f)

    def freeze(
        self, item: str, seq: int, view_id: str | None = None, owners: Iterable[Path] = ()
    ) -> str:
        """A frozen view of retained point `seq` (its undo records pinned); returns its id.
        With `view_id` the call is idempotent (a view of that id and point is kept as is);
        with `owners` the view lives while one of those files names it (see replica_format)."""
        with self._lock(item):
            f = self._open(item)
            if view_id is not None and not VIEW_ID.fullmatch(view_id):
                raise ReplicaError(f"bad view id {view_id!r}")
            view_id = view_id or uuid.uuid4().hex
            existing = view_seqs(f).get(view_id)
            if existing is not None:
                if existing != seq:
                    raise ReplicaError(f"view {view_id} is of point {existing}, not {seq}")
                return view_id
            if seq not in self.retained(item):
                raise ReplicaError(f"point {seq} is not retained here")
            doc: dict[str, Any] = {"seq": seq}
            if owners:
                doc["owners"] = [str(p) for p in owners]
            f.views.mkdir(parents=True, exist_ok=True)
            write_atomic(f.views / f"{view_id}.json", json.dumps(doc).encode())
            crash_point("replica.view.frozen")
            return view_id

    def drop_view(self, item: str, view_id: str) -> None:
        with self._lock(item):
            f = self._open(item)
            (f.views / f"{view_id}.json").unlink(missing_ok=True)
            self._views.forget_view(item, view_id)
            if f.views.is_dir():
                fsync_dir(f.views)
            crash_point("replica.view.dropped")

    def view_point(self, item: str, view_id: str) -> Point:
        """The view's point: each disk's size and block size there, and the Merkle root of
        what the view reads (computed from HEAD's leaves and the pinned records' old ones)."""
        with self._lock(item):
            return self._views.point(item, self._open(item), view_id)

    def read_view(self, item: str, view_id: str, disk_id: str, first: int, count: int) -> bytes:
        """Blocks first..first+count-1 of a disk as the view holds them (the pinned records'
        bytes where the replica has overwritten them since, else the image's), the last one
        short at the disk's end; nothing past it."""
        with self._lock(item):
            return self._views.read(item, self._open(item), view_id, disk_id, first, count)

    def view_sha256(self, item: str, view_id: str, disk_id: str) -> str:
        """SHA-256 of a disk as the frozen view holds it (read through the undo records)."""
        point = self.view_point(item, view_id)
        disk = point.disk(disk_id)
        if disk is None:
            raise ReplicaError(f"disk {disk_id} is not in view {view_id}")
        digest = hashlib.sha256()
        n = block_count(disk.size_bytes, disk.block_size)
        step = max(1, _IO_CHUNK * 16 // disk.block_size)
        for first in range(0, n, step):
            digest.update(self.read_view(item, view_id, disk_id, first, step))
        return digest.hexdigest()

    def prune(self, item: str, oldest: int) -> int:
        """Keep points `oldest`..HEAD: delete the undo records at or below `oldest` that no
        frozen view needs. Returns how many were deleted."""
        with self._lock(item):
            f = self._open(item)
            self._views.sweep(item, f)
            floor = min([oldest, *view_seqs(f).values()])
            gone = [s for s in f.undo_seqs() if s <= floor]
            for seq in gone:
                f.undo_of(seq).unlink()
                crash_point("replica.prune.dropped")
            if gone:
                fsync_dir(f.undo)
            return len(gone)

    def delete_item(self, item: str) -> None:
        with self._lock(item):
            f = self.files(item)
            if f.root.exists():
                trash = self.root / "trash" / f"{item}.{uuid.uuid4().hex[:8]}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f.root, trash)
                shutil.rmtree(trash, ignore_errors=True)
            self._recovered.discard(item)
            self._views.forget(item)
            self._trees.forget(item)

    # ------------------------------------------------------------------ recovery

    def recover(self, item: str) -> None:
        """Finish what a kill left (also run on an item's first use)."""
        with self._lock(item):
            self._recovered.discard(item)
            self._open(item)

    def _recover(self, item: str, f: ItemFiles) -> None:
        if f.tmp.is_dir():
            shutil.rmtree(f.tmp)
        if not f.root.is_dir():
            return
        if f.seeding.is_dir() and f.head.exists():
            shutil.rmtree(f.seeding)  # a seed killed after its HEAD (before: re-run goes on)
        self._trees.forget(item)
        self._views.forget(item)
        head = f.read_head()
        for seq in f.undo_seqs():
            if seq <= head.seq:
                continue
            # An undo record above HEAD: an apply past its point of no return (rolled forward
            # when its point is staged), or the last record of a rollback step whose HEAD had
            # moved (the images are HEAD's already: restoring it again changes nothing).
            if undo_prev(f.undo_of(seq)) == head.seq and f.staged_point(seq).exists():
                self._recovered.add(item)  # apply() must not recurse into recovery
                with contextlib.suppress(RootMismatch):  # undone by apply; HEAD stays
                    self.apply(item, seq, head.seq)
                head = f.read_head()
            else:
                restore(self._trees, item, f, seq)
                os.unlink(f.undo_of(seq))
                fsync_dir(f.undo)
        if f.rollback.exists():
            to = int(json.loads(f.rollback.read_bytes())["to"])
            head = self._roll_back(item, f, to)
        self._unstage(f, head.seq)
        if f.views.is_dir():
            self._views.sweep(item, f)

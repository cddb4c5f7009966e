"""Pruning an item's points: folding removed points into the base or the next kept point,
the PRUNE.json journal that makes it crash-safe, and marking the blocks still referenced for
the pack sweep. `ReplicaStore.prune` runs these steps under the item's lock; the order and
the crash points are docs/replica-store.md's."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from services.replication.store import points
from services.replication.store.layout import Layout, dumps, mkdir_durable, write_synced
from services.replication.store.maps import DiskMap
from services.replication.store.packs import Packs
from shared.faults import crash_point
from shared.files import fsync_dir


def stage(layout: Layout, seqs: list[int], keep: set[int]) -> dict[str, Any]:
    """Write the new base under a new name and stage the rewritten manifests as `.next`;
    returns the journal that finishes the prune (`roll_forward`)."""
    old_base = points.base_seq(layout)
    oldest_kept = min(s for s in seqs if s in keep)
    folded = [s for s in seqs if s < oldest_kept]
    new_base = folded[-1] if folded else old_base
    maps = points.base_maps(layout)
    prev_kept: dict[str, DiskMap] = {}
    skipped = False  # removed points since the previous kept one
    rewrite: list[int] = []
    mkdir_durable(layout.tmp)
    for seq in seqs:
        stored = points.read_point(layout, seq)
        maps = points.advance(maps, stored)
        if seq == new_base and folded:
            write_base(layout, seq, maps)
            crash_point("store.prune.base_written")
            prev_kept = {d: m.copy() for d, m in maps.items()}
        elif seq in keep:
            if skipped:
                stored.deltas = {d: m.diff(prev_kept.get(d)) for d, m in maps.items()}
                mtime = layout.point(seq).stat().st_mtime_ns  # keep the commit time
                tmp = layout.temp("point")
                write_synced(tmp, dumps(stored.to_json()))
                os.utime(tmp, ns=(mtime, mtime))
                os.replace(tmp, layout.staged_point(seq))
                crash_point("store.prune.point_staged")
                rewrite.append(seq)
            prev_kept = {d: m.copy() for d, m in maps.items()}
            skipped = False
        elif seq not in folded:
            skipped = True
    fsync_dir(layout.points)
    return {
        "base": new_base,
        "old_base": old_base,
        "remove": [s for s in seqs if s not in keep],
        "rewrite": rewrite,
    }


def write_base(layout: Layout, seq: int, maps: dict[str, DiskMap]) -> None:
    folder = layout.temp(f"base-{seq:012d}")
    folder.mkdir()
    disks = []
    for n, (disk_id, m) in enumerate(sorted(maps.items())):
        write_synced(folder / f"{n}.bin", bytes(m.leaves))
        disks.append(
            {
                "disk_id": disk_id,
                "size_bytes": m.size_bytes,
                "block_size": m.block_size,
                "file": f"{n}.bin",
            }
        )
    write_synced(folder / "base.json", dumps({"seq": seq, "disks": disks}))
    fsync_dir(folder)
    mkdir_durable(layout.base)
    os.replace(folder, layout.base_dir(seq))
    fsync_dir(layout.base)


def write_journal(layout: Layout, journal: Mapping[str, Any]) -> None:
    """The prune's point of no return: before it `recover` rolls back, after it forward."""
    tmp = layout.temp("journal")
    write_synced(tmp, dumps(journal))
    os.replace(tmp, layout.journal)
    fsync_dir(layout.dir)


def roll_forward(
    layout: Layout, journal: Mapping[str, Any], sweep: Callable[[bool], object]
) -> None:
    """Everything after the journal; each step idempotent, so a re-run after a crash at
    any instant ends in the same state. `sweep(spare_recent)` frees unreferenced blocks."""
    if journal["base"] != journal["old_base"]:
        mkdir_durable(layout.tmp)
        tmp = layout.temp("BASE")
        write_synced(tmp, dumps({"seq": journal["base"]}))
        os.replace(tmp, layout.base_pointer)
        fsync_dir(layout.dir)
        crash_point("store.prune.base_switched")
    for seq in journal["rewrite"]:
        if layout.staged_point(seq).exists():
            os.replace(layout.staged_point(seq), layout.point(seq))
    fsync_dir(layout.points)
    crash_point("store.prune.manifests_replaced")
    for seq in journal["remove"]:
        layout.point(seq).unlink(missing_ok=True)
    fsync_dir(layout.points)
    crash_point("store.prune.points_deleted")
    if journal["base"] != journal["old_base"] and journal["old_base"]:
        shutil.rmtree(layout.base_dir(journal["old_base"]), ignore_errors=True)
        fsync_dir(layout.base)
        crash_point("store.prune.old_base_deleted")
    sweep(not journal.get("truncate", False))
    crash_point("store.prune.swept")
    layout.journal.unlink()
    fsync_dir(layout.dir)


def collect_garbage(layout: Layout, packs: Packs, *, spare_recent: bool = True) -> int:
    """Mark (base + retained deltas) and sweep (`Packs.collect`); unreferenced blocks
    stored or touched after the latest commit belong to the cycle in flight and stay
    (unless not `spare_recent`). Returns bytes freed."""
    seqs = points.point_seqs(layout)
    if not seqs or not packs.sizes:
        return 0
    cutoff = layout.point(seqs[-1]).stat().st_mtime_ns if spare_recent else 2**63
    packs.close()  # the pack being appended to is swept too (unless it is recent)
    live: set[str] = set()
    for m in points.base_maps(layout).values():
        live.update(m.leaf(i).hex() for i in range(m.count))
    for seq in seqs:
        live.update(
            sha for delta in points.read_point(layout, seq).deltas.values() for _, sha in delta
        )
    return packs.collect(
        live,
        cutoff,
        lambda: crash_point("store.prune.sweeping"),
        compact_below=None if spare_recent else 1.0,
    )

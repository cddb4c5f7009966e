"""Reading an item's retained points from disk: which are retained (above the base), their
manifests, the compacted base, and the leaf maps of a point replayed from them (the base, then
each retained point's delta; docs/replica-store.md)."""

from __future__ import annotations

from services.replication.store.errors import StoreError, UnknownPoint
from services.replication.store.layout import POINT_FILE, Layout, read_json
from services.replication.store.manifest import StoredPoint
from services.replication.store.maps import DiskMap
from shared.merkle import block_count


def base_seq(layout: Layout) -> int:
    """The point the compacted base holds (0: no base)."""
    if not layout.base_pointer.exists():
        return 0
    return int(read_json(layout.base_pointer)["seq"])


def seqs_above(layout: Layout, above: int) -> list[int]:
    """The seqs of the manifest files above `above`, in order."""
    if not layout.points.is_dir():
        return []
    seqs = (POINT_FILE.fullmatch(p.name) for p in layout.points.iterdir())
    return sorted(s for s in (int(m.group(1)) for m in seqs if m) if s > above)


def point_seqs(layout: Layout) -> list[int]:
    """The retained points, oldest first."""
    return seqs_above(layout, base_seq(layout))


def read_point(layout: Layout, seq: int) -> StoredPoint:
    path = layout.point(seq)
    if seq <= base_seq(layout) or not path.exists():
        raise UnknownPoint(f"recovery point {seq} of item {layout.dir.name} is not retained")
    return StoredPoint.from_json(read_json(path))


def base_maps(layout: Layout) -> dict[str, DiskMap]:
    seq = base_seq(layout)
    if seq == 0:
        return {}
    folder = layout.base_dir(seq)
    maps: dict[str, DiskMap] = {}
    for disk in read_json(folder / "base.json")["disks"]:
        leaves = bytearray((folder / disk["file"]).read_bytes())
        maps[disk["disk_id"]] = DiskMap(disk["size_bytes"], disk["block_size"], leaves)
        if maps[disk["disk_id"]].count != block_count(disk["size_bytes"], disk["block_size"]):
            raise StoreError(f"base {folder} disk {disk['disk_id']}: wrong leaf count")
    return maps


def advance(maps: dict[str, DiskMap], point: StoredPoint) -> dict[str, DiskMap]:
    """The maps after `point` (mutates the maps it reuses)."""
    after: dict[str, DiskMap] = {}
    for disk in point.manifest.disks:
        m = maps.get(disk.disk_id) or DiskMap(0, disk.block_size, bytearray())
        if m.block_size != disk.block_size:
            m = DiskMap(0, disk.block_size, bytearray())
        m.resize(disk.size_bytes)
        m.apply(point.deltas[disk.disk_id])
        after[disk.disk_id] = m
    return after


def replay(layout: Layout, seq: int) -> dict[str, DiskMap]:
    """The maps of retained point `seq`: the base, then every retained point up to it."""
    read_point(layout, seq)  # raises UnknownPoint
    maps = base_maps(layout)
    for s in point_seqs(layout):
        if s > seq:
            break
        maps = advance(maps, read_point(layout, s))
    return maps

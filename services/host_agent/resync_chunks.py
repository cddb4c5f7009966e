"""The replica's leaf hashes for a resync, as its `ResyncRequested` chunks arrive: kept per
chunk under `<item folder>/resync/<resync_id>/` until every chunk of every disk is in."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from shared.files import write_atomic
from shared.merkle import HASH_SIZE
from shared.schemas.agent import ResyncRequested


def store_resync_chunk(item_folder: Path, command: ResyncRequested) -> bool:
    """Keep one chunk of the replica's hashes (`<disk>.<chunk_no>.<chunks>.json`); True once
    every chunk of every disk is in."""
    folder = item_folder / "resync" / str(command.resync_id)
    folder.mkdir(parents=True, exist_ok=True)
    disk = hashlib.sha256(command.disk_id.encode()).hexdigest()[:16]
    name = f"{disk}.{command.chunk_no}.{command.chunks}.json"
    write_atomic(folder / name, command.model_dump_json().encode())
    by_disk: dict[str, tuple[set[int], int]] = {}
    for p in folder.glob("*.json"):
        disk, chunk_no, chunks, _ = p.name.split(".")
        nos, _ = by_disk.setdefault(disk, (set(), int(chunks)))
        nos.add(int(chunk_no))
    return len(by_disk) == command.disk_count and all(
        len(nos) >= chunks for nos, chunks in by_disk.values()
    )


def load_replica_leaves(folder: Path) -> dict[str, tuple[int, bytes]]:
    """disk id -> (replica size, concatenated leaf hashes) from the stored chunks."""
    parts: dict[str, list[ResyncRequested]] = {}
    for p in folder.glob("*.json"):
        c = ResyncRequested.model_validate_json(p.read_text())
        parts.setdefault(c.disk_id, []).append(c)
    out = {}
    for disk_id, chunks in parts.items():
        leaves = bytearray()
        for c in sorted(chunks, key=lambda c: c.first_index):
            raw = base64.b64decode(c.leaf_hashes) if c.leaf_hashes else b""
            leaves[c.first_index * HASH_SIZE : c.first_index * HASH_SIZE + len(raw)] = raw
        out[disk_id] = (chunks[0].size_bytes, bytes(leaves))
    return out

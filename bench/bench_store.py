"""Replica store benchmark, on the local disk (a temp folder under /tmp, removed afterwards).

- apply: delta cycles of 1 % random changed 64 KiB blocks of a 1 GiB disk, put in batches of
  64 (one `BlocksShipped`) and committed (root check included); MB/s of changed data.
- durability per batch: `put_blocks` of 164 blocks (one pack append + fdatasync) beside a file
  per block, each fsynced and renamed into place, folders fsynced, alternating; MB/s and ratio.
- materialise: the latest point of that disk to an image (fsynced, every block re-verified),
  MB/s, and as a ratio to a plain `shutil.copyfile` of the 1 GiB source image in the same run.
- peak RSS of materialising a 4 GiB disk that is 98 % zero blocks, measured first, in a child
  process (`resource.getrusage`), beside the child's RSS before it starts materialising.

Lines: `bench <name> <value> <unit>`. Run: `.venv/bin/python -m bench.bench_store`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from kit.files import file_sha256
from services.replication.store import DiskPoint, PointManifest, ReplicaStore
from shared.merkle import MerkleTree, block_hash, zero_block_hash

BS = 64 * 1024
GIB = 2**30
BATCH = 64
CYCLES = 5
REPO = Path(__file__).resolve().parents[1]


def files_each_fsynced(folder: Path, blocks: Iterable[bytes]) -> None:
    """The baseline: a file per block (named by its SHA-256 in 256 shard folders) written to
    a temp name, fsynced, renamed into place; every folder touched fsynced."""
    tmp = folder / "tmp"
    tmp.mkdir(parents=True)
    touched: set[Path] = set()
    for data in blocks:
        sha = hashlib.sha256(data).hexdigest()
        shard = folder / sha[:2]
        shard.mkdir(exist_ok=True)
        staged = tmp / sha
        with open(staged, "wb") as fh:
            fh.write(data)
            os.fsync(fh.fileno())
        os.replace(staged, shard / sha)
        touched.add(shard)
    for path in [folder, *touched]:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def emit(name: str, value: float, unit: str) -> None:
    print(f"bench {name} {value:.6g} {unit}", flush=True)


def put(store: ReplicaStore, item: str, blocks: dict[int, bytes]) -> None:
    pairs = [(i, block_hash(b).hex(), b) for i, b in blocks.items()]
    for start in range(0, len(pairs), BATCH):
        store.put_blocks(item, pairs[start : start + BATCH])


def manifest(seq: int, tree: MerkleTree, size: int, changed: dict[int, bytes]) -> PointManifest:
    disk = DiskPoint(
        "d0", size, BS, tree.root_hex(), {i: block_hash(b).hex() for i, b in changed.items()}
    )
    return PointManifest(seq, "initial" if seq == 1 else "delta", datetime.now(UTC), False, [disk])


def sparse_disk(store: ReplicaStore, item: str, size: int, fraction: float) -> None:
    """Commit one point of a `size` disk whose blocks are zero but for a random `fraction`."""
    n = size // BS
    tree = MerkleTree.from_leaves([zero_block_hash(BS)] * n, n)
    changed = {i: os.urandom(BS) for i in random.Random(1).sample(range(n), int(n * fraction))}
    for i, data in changed.items():
        tree.set_leaf(i, block_hash(data), rehash=False)
    put(store, item, changed)
    store.commit_point(item, manifest(1, tree, size, changed))


def child(function: str, *args: str) -> str:
    """Run `function(*args)` of this module in a fresh interpreter; its last stdout line."""
    code = f"import sys; from bench.bench_store import {function}; {function}(*sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, check=True, text=True
    )
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def sparse_child(root: str, item: str) -> None:
    store = ReplicaStore(Path(root))
    sparse_disk(store, item, 4 * GIB, 0.02)


def rss_child(root: str, item: str, out: str) -> None:
    """Run in a fresh process: materialise the 4 GiB point, report RSS before and at peak."""
    store = ReplicaStore(Path(root))
    store.latest_seq(item)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store.materialise(item, 1, "d0", Path(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "peak_kib": peak}))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir="/tmp"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path) -> None:
    store = ReplicaStore(work / "site")

    # peak RSS of materialising a 4 GiB disk, 2 % non-zero: built in one child, materialised in
    # another spawned while this process holds only its imports (on Linux a child starts with
    # its parent's peak RSS)
    child("sparse_child", str(work / "site"), "sparse")
    rss = json.loads(child("rss_child", str(work / "site"), "sparse", str(work / "sparse.img")))
    emit("store_materialise_4gib_peak_rss", rss["peak_kib"] / 1024, "MiB")
    emit("store_materialise_4gib_rss_growth", (rss["peak_kib"] - rss["before_kib"]) / 1024, "MiB")
    store.delete_item("sparse")
    (work / "sparse.img").unlink()

    n = GIB // BS
    source = work / "source.img"

    # the initial copy: a 1 GiB disk of random blocks
    tree = MerkleTree(n)
    start = time.perf_counter()
    with source.open("wb") as fh:
        for first in range(0, n, 1024):
            blocks = {i: os.urandom(BS) for i in range(first, first + 1024)}
            for i, data in blocks.items():
                fh.write(data)
                tree.set_leaf(i, block_hash(data), rehash=False)
            put(store, "big", blocks)
    store.commit_point("big", manifest_all(tree))
    emit("store_initial_1gib", GIB / 1e6 / (time.perf_counter() - start), "MB/s")

    # delta cycles: 1 % of the blocks changed
    rng = random.Random(7)
    spent = commit_spent = 0.0
    changed_bytes = 0
    with source.open("r+b") as fh:
        for seq in range(2, 2 + CYCLES):
            changed = {i: os.urandom(BS) for i in rng.sample(range(n), n // 100)}
            for i, data in changed.items():
                fh.seek(i * BS)
                fh.write(data)
                tree.set_leaf(i, block_hash(data))
            m = manifest(seq, tree, GIB, changed)
            t0 = time.perf_counter()
            put(store, "big", changed)
            t1 = time.perf_counter()
            store.commit_point("big", m)
            t2 = time.perf_counter()
            spent += t2 - t0
            commit_spent += t2 - t1
            changed_bytes += len(changed) * BS
    emit("store_apply_1pct_of_1gib", changed_bytes / 1e6 / spent, "MB/s")
    emit("store_commit_latency_164_blocks", commit_spent / CYCLES * 1000, "ms")

    # durability per batch: the store's one append + fdatasync to a pack vs a file per block,
    # each fsynced and renamed into place, folders fsynced (same blocks, same disk, alternating
    # so that both see the same background writeback)
    rates: dict[bool, list[float]] = {True: [], False: []}
    for round_no in range(2 * CYCLES):
        packed = round_no % 2 == 0
        blocks = {i: os.urandom(BS) for i in range(n // 100)}
        t0 = time.perf_counter()
        if packed:
            put(store, f"sync-{round_no}", blocks)
        else:
            files_each_fsynced(work / f"files-{round_no}", blocks.values())
        rates[packed].append(len(blocks) * BS / 1e6 / (time.perf_counter() - t0))
        if packed:
            store.delete_item(f"sync-{round_no}")
        else:
            shutil.rmtree(work / f"files-{round_no}")
    pack_rate, files_rate = (sorted(rates[k])[len(rates[k]) // 2] for k in (True, False))
    emit("store_put_164_blocks_pack", pack_rate, "MB/s")
    emit("store_put_164_blocks_file_each_fsync", files_rate, "MB/s")
    emit("store_put_pack_vs_file_each_fsync", pack_rate / files_rate, "x")

    # materialise the latest point vs copying the source image
    source_sha = file_sha256(source)
    t0 = time.perf_counter()
    sha = store.materialise("big", 1 + CYCLES, "d0", work / "restored.img")
    materialise_s = time.perf_counter() - t0
    assert sha == source_sha, "materialised image differs from the source"
    (work / "restored.img").unlink()
    t0 = time.perf_counter()
    shutil.copyfile(source, work / "copy.img")
    copy_s = time.perf_counter() - t0
    (work / "copy.img").unlink()
    t0 = time.perf_counter()
    shutil.copyfile(source, work / "copy.img")
    with (work / "copy.img").open("rb") as fh:
        os.fsync(fh.fileno())
    copy_fsync_s = time.perf_counter() - t0
    emit("store_materialise_1gib", GIB / 1e6 / materialise_s, "MB/s")
    emit("copyfile_1gib", GIB / 1e6 / copy_s, "MB/s")
    emit("copyfile_fsync_1gib", GIB / 1e6 / copy_fsync_s, "MB/s")
    emit("store_materialise_vs_copyfile", copy_s / materialise_s, "x")
    emit("store_materialise_vs_copyfile_fsync", copy_fsync_s / materialise_s, "x")
    store.delete_item("big")
    for name in ("copy.img", "source.img"):
        (work / name).unlink()


def manifest_all(tree: MerkleTree) -> PointManifest:
    """The initial point: every block changed (leaves straight from the tree)."""
    changed = {i: leaf.hex() for i, leaf in enumerate(tree.leaf_hashes())}
    disk = DiskPoint("d0", GIB, BS, tree.root_hex(), changed)
    return PointManifest(1, "initial", datetime.now(UTC), False, [disk])


if __name__ == "__main__":
    main()

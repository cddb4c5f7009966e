"""kill -9 at every crash point of the replica store's prune and commit (and of a recovery that
is itself interrupted): no committed point that was kept is lost, every survivor verifies and
materialises byte-identical, no temp file stays, and the store goes on working.

Runs the operation in a child process with DR_CRASH_AT (shared.faults); needs no Kafka or
PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.replication.store import ReplicaStore
from services.replication.store import packs as store_packs
from tests.support.store_worker import SourceDisk, stage_cycle

REPO = Path(__file__).resolve().parents[2]
BS = 4096
ITEM = "item"
PRUNE_POINTS = [
    "store.prune.base_written",
    "store.prune.point_staged",
    "store.prune.staged",
    "store.prune.journaled",
    "store.prune.base_switched",
    "store.prune.manifests_replaced",
    "store.prune.points_deleted",
    "store.prune.old_base_deleted",
    "store.prune.sweeping",
    "store.prune.swept",
]
KEEP = {4, 6, 8}


class Scenario:
    """Eight points of one disk (a resize at 4, an earlier prune so a base exists)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.disk = SourceDisk("d0", 256 * BS + 1000, BS, random.Random(5))
        self.history: dict[int, str] = {}
        # a pack per cycle (the worker compacts any pack with garbage): the sweep has packs to
        # delete and to rewrite, so its crash points are reached
        original, store_packs.PACK_BYTES = store_packs.PACK_BYTES, 1
        try:
            self._build(root)
        finally:
            store_packs.PACK_BYTES = original

    def _build(self, root: Path) -> None:
        store = ReplicaStore(root)
        self.disk.write_random(0.5)
        for seq in range(1, 9):
            if seq > 1:
                self.disk.write_random(0.08)
                self.disk.zero(self.disk.rng.sample(range(self.disk.blocks), 4))
            if seq == 4:
                self.disk.resize(300 * BS + 17)
            store.commit_point(ITEM, stage_cycle(store, ITEM, seq, [self.disk]))
            self.history[seq] = self.disk.sha256()
            if seq == 6:
                store.prune(ITEM, {2, 3, 4, 5, 6})  # base at 1
        store.close()

    def run(self, op: str, arg: str, crash_at: str) -> None:
        child = subprocess.run(
            [sys.executable, "-m", "tests.support.store_worker", str(self.root), op, ITEM, arg],
            cwd=REPO,
            env={**os.environ, "DR_CRASH_AT": crash_at},
            capture_output=True,
            timeout=60,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]

    def check(self, store: ReplicaStore, must_have: set[int]) -> list[int]:
        """Every surviving point verifies and materialises byte-identical; no temp files."""
        seqs = [p.seq for p in store.points(ITEM)]
        assert must_have <= set(seqs)
        for seq in seqs:
            assert store.verify_point(ITEM, seq).ok, seq
            out = self.root.parent / f"check-{seq}.img"
            sha = store.materialise(ITEM, seq, "d0", out)
            assert sha == self.history[seq] == hashlib.sha256(out.read_bytes()).hexdigest()
            out.unlink()
        item = self.root / "items" / ITEM
        assert not (item / "PRUNE.json").exists()
        assert not list((item / "points").glob("*.next"))
        assert not (item / "tmp").exists() or not list((item / "tmp").iterdir())
        assert not list(self.root.parent.glob("*.partial"))
        return seqs

    def go_on(self, store: ReplicaStore, next_seq: int) -> None:
        """A later prune and commit work, and the result is right."""
        latest = store.latest_seq(ITEM)
        assert latest is not None
        store.prune(ITEM, {latest})
        self.disk.write_random(0.05)
        store.commit_point(ITEM, stage_cycle(store, ITEM, next_seq, [self.disk]))
        self.history[next_seq] = self.disk.sha256()
        assert self.check(store, {latest, next_seq}) == [latest, next_seq]


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    return Scenario(tmp_path / "site")


@pytest.mark.parametrize("crash_at", PRUNE_POINTS)
def test_kill_9_mid_prune(scenario: Scenario, crash_at: str) -> None:
    scenario.run("prune", ",".join(map(str, sorted(KEEP))), crash_at)
    store = ReplicaStore(scenario.root)
    store.recover(ITEM)
    seqs = scenario.check(store, KEEP)
    journaled = PRUNE_POINTS.index(crash_at) >= PRUNE_POINTS.index("store.prune.journaled")
    assert seqs == (sorted(KEEP) if journaled else [2, 3, 4, 5, 6, 7, 8])
    scenario.go_on(store, 9)


@pytest.mark.parametrize("crash_at", ["store.commit.staged", "store.commit.renamed"])
def test_kill_9_mid_commit(scenario: Scenario, crash_at: str) -> None:
    store = ReplicaStore(scenario.root)
    scenario.disk.write_random(0.05)
    manifest = stage_cycle(store, ITEM, 9, [scenario.disk])
    scenario.history[9] = scenario.disk.sha256()
    path = scenario.root.parent / "manifest.json"
    path.write_text(json.dumps(manifest.to_json()))
    scenario.run("commit", str(path), crash_at)
    store = ReplicaStore(scenario.root)
    store.recover(ITEM)
    seqs = scenario.check(store, {2, 3, 4, 5, 6, 7, 8})
    assert seqs[-1] == (8 if crash_at == "store.commit.staged" else 9)
    store.commit_point(ITEM, manifest)  # the service retries: commits, or is a no-op
    scenario.check(store, {8, 9})
    scenario.go_on(store, 10)


def test_kill_9_during_recovery_of_a_killed_prune(scenario: Scenario) -> None:
    scenario.run("prune", "4,6,8", "store.prune.points_deleted")
    scenario.run("recover", "-", "store.prune.sweeping")
    store = ReplicaStore(scenario.root)  # lazy recovery on first use
    assert scenario.check(store, KEEP) == sorted(KEEP)
    scenario.go_on(store, 9)

"""Replication under faults, with a block copy in the service's replica store (its commit, prune
and storage failures are what is tested): kill -9 of the replication service mid-cycle,
mid-commit and mid-prune; a Kafka restart; a killed agent; a full replica store; a missing disk
image. No committed recovery point is lost, every point still verifies, and the item catches up
(without a full resync where none is needed). What the service noted about an item (a
dead-lettered delta record, a storage failure) stays on it across a restart of the service."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.dr import DrSetup, item, points, protect, two_sites, vm_named
from kit.files import file_sha256
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack, fresh_database, random_prefix, stack_command
from shared import topics
from shared.schemas import replication as ev
from tests.e2e.test_replication_bad_input_e2e import BLOCKS, scripted_item
from tests.e2e.test_replication_e2e import materialise, point_after
from tests.support.kafka import read_all
from tests.support.own_platform import WITH_BLOCK_COPY

pytestmark = pytest.mark.e2e


@pytest.fixture
async def plat(stack: Stack, tmp_path: Path) -> AsyncIterator[Platform]:
    own = Platform(
        stack=stack,
        database_url=await fresh_database(stack, "faults"),
        prefix=random_prefix("faults"),
        log_dir=tmp_path,
        replication_env=WITH_BLOCK_COPY,
    )
    try:
        yield own
    finally:
        await own.close()


async def replicating_vm(
    plat: Platform, http: httpx.AsyncClient, root: Path, replication_env: dict[str, str]
) -> tuple[DrSetup, str]:
    plat.start("replication", replication_env)
    dr = await two_sites(plat, http, root, copy_seconds=1)
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": "db01", "disks": ["2MiB", "1MiB"]})
    vm = await vm_named(http, dr, "db01")
    protected = await protect(http, dr, vm["vm_id"])
    await dr.agent_call(http, "hv-p1", "POST", "/vms/db01/workload", {"blocks_per_second": 20})
    return dr, protected["item_id"]


async def live_seqs(http: httpx.AsyncClient, dr: DrSetup, item_id: str) -> set[int]:
    return {p["cycle_seq"] for p in await points(http, dr, item_id)}


async def pruned_seqs(plat: Platform, item_id: str) -> set[int]:
    records = await read_all(plat.stack.kafka, plat.prefix + topics.REPLICATION_EVENTS)
    out: set[int] = set()
    for r in records:
        body = r.json()
        if body["type"] == "RecoveryPointsPruned" and body["payload"]["item_id"] == item_id:
            out |= set(body["payload"]["cycle_seqs"])
    return out


async def all_verify(http: httpx.AsyncClient, dr: DrSetup, item_id: str) -> None:
    for seq in await live_seqs(http, dr, item_id):
        resp = await http.post(
            dr.url("replication", f"/protected-items/{item_id}/recovery-points/{seq}/verify"),
            headers=dr.bearer(dr.reader),
        )
        if (resp.status_code == 404 and "pruned" in resp.text) or (
            resp.status_code == 409 and "not retained" in resp.text
        ):
            # retention pruned it between the listing and the check (before the check looked
            # up the point, or while it read the blocks; without a block copy here, the
            # recovery host pruned it first): then it leaves the list (its row goes in the
            # prune's last step, after its blocks)
            async def gone(seq: int = seq) -> bool:
                return seq not in await live_seqs(http, dr, item_id)

            await eventually(gone, timeout=60, what=f"pruned point {seq} off the list")
            continue
        assert resp.status_code == 200 and resp.json()["ok"], f"point {seq}: {resp.text}"


async def no_data_lost(http: httpx.AsyncClient, dr: DrSetup, item_id: str, root: Path) -> None:
    """Replication goes on after an outage (three more points), every point verifies, and
    with the writes stopped the latest point materialises to the source disks byte for byte."""
    before = await item(http, dr, item_id)

    async def caught_up() -> dict[str, Any] | None:
        current = await item(http, dr, item_id)
        moving = (current["last_committed_seq"] or 0) > before["last_committed_seq"] + 3
        return current if moving and current["state"] == "replicating" else None

    current = await eventually(caught_up, timeout=120, what="cycles committed after the outage")
    await dr.agent_call(http, "hv-p1", "POST", "/vms/db01/workload", {"blocks_per_second": 0})
    stopped_at = datetime.now().astimezone()
    source = {d["disk_id"]: file_sha256(Path(d["path"])) for d in current["disks"]}
    latest = await point_after(http, dr, item_id, stopped_at)
    target = dr.storage("recovery", "hv-r1") / "latest"  # a folder the recovery host may write
    got = await materialise(http, dr, item_id, latest["cycle_seq"], target)
    assert got == source, f"point {latest['cycle_seq']} differs from the source"
    await all_verify(http, dr, item_id)


@pytest.mark.parametrize(
    "crash_at",
    ["replication.blocks_stored@12", "store.commit.renamed@6", "store.prune.journaled"],
)
async def test_kill_replication_service_loses_no_point(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path, crash_at: str
) -> None:
    env = {
        "DR_CRASH_AT": crash_at,
        "DR_REPLICATION_KEEP_RECENT_POINTS": "3",
        "DR_REPLICATION_RETENTION_INTERVAL_SECONDS": "1",
    }
    dr, item_id = await replicating_vm(plat, http, tmp_path, env)
    service = plat.services["replication"]
    seen: set[int] = set()

    async def killed() -> bool:
        if service.alive():
            with contextlib.suppress(httpx.HTTPError, AssertionError):  # it may die answering
                seen.update(await live_seqs(http, dr, item_id))
            return False
        return True

    await eventually(killed, timeout=90, interval=0.3, what=f"kill -9 at {crash_at}")
    assert service.popen is not None and service.popen.returncode == -9
    assert seen, "points were committed before the crash"
    service.env.pop("DR_CRASH_AT")
    service.start()

    async def caught_up() -> dict[str, Any] | None:
        current = await item(http, dr, item_id)
        done = current["state"] == "replicating" and current["last_committed_seq"] > max(seen) + 2
        return current if done else None

    await eventually(caught_up, timeout=90, what="the item catches up after the restart")
    lost = seen - await live_seqs(http, dr, item_id) - await pruned_seqs(plat, item_id)
    assert not lost, f"committed points lost: {sorted(lost)}"
    await all_verify(http, dr, item_id)


@pytest.mark.timeout(900)
async def test_kafka_restart_resumes_without_full_resync(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr, item_id = await replicating_vm(plat, http, tmp_path, {})

    async def some_points() -> int | None:
        current = await item(http, dr, item_id)
        return current["last_committed_seq"] if (current["last_committed_seq"] or 0) >= 3 else None

    before = await eventually(some_points, timeout=60, what="replicating")
    await stack_command("kafka-restart")

    async def moving_again() -> dict[str, Any] | None:
        current = await item(http, dr, item_id)
        return current if (current["last_committed_seq"] or 0) > before + 3 else None

    after = await eventually(moving_again, timeout=240, what="cycles committed after restart")
    assert after["state"] == "replicating"
    events = await read_all(plat.stack.kafka, plat.prefix + topics.REPLICATION_EVENTS)
    states = [
        r.json()["payload"]["state"]
        for r in events
        if r.json()["type"] == "ItemStateChanged" and r.json()["payload"]["item_id"] == item_id
    ]
    assert "waiting_to_start_resync" not in states and "resynchronizing" not in states, states
    await all_verify(http, dr, item_id)


async def test_killed_agent_degrades_health_and_recovers(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    env = {
        "DR_REPLICATION_MONITORING_WINDOW_SECONDS": "12",
        "DR_REPLICATION_STALE_LOG_SECONDS": "4",
    }
    dr, item_id = await replicating_vm(plat, http, tmp_path, env)

    async def healthy() -> dict[str, Any] | None:
        current = await item(http, dr, item_id)
        ok = current["health"] == "Normal" and (current["last_committed_seq"] or 0) >= 3
        return current if ok else None

    await eventually(healthy, timeout=60, what="healthy replication")
    agent = dr.agents["hv-p1"]
    agent.kill()

    async def degraded() -> dict[str, Any] | None:
        current = await item(http, dr, item_id)
        return current if current["health"] in ("Warning", "Critical") else None

    bad = await eventually(degraded, timeout=60, what="health degrades after the agent dies")
    assert bad["health_reasons"], bad
    agent.start(extra_env={"DR_AGENT_REGISTRATION_KEY": ""})

    async def recovered() -> dict[str, Any] | None:
        current = await item(http, dr, item_id)
        ok = current["health"] == "Normal" and current["state"] == "replicating"
        return current if ok and current["last_committed_seq"] > bad["last_committed_seq"] else None

    await eventually(recovered, timeout=120, what="health back to Normal")
    await all_verify(http, dr, item_id)


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (root only: the test is skipped otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem for the replica store needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its filesystem is full (ENOSPC)."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb") as out:
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


@pytest.mark.timeout(600)
async def test_replica_storage_full_shows_on_the_item_then_recovers(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    with small_filesystem(tmp_path / "store", "64m") as store:
        env = {"DR_REPLICATION_STORE_DIR": str(store), "DR_REPLICATION_KEEP_RECENT_POINTS": "3"}
        dr, item_id = await replicating_vm(plat, http, tmp_path, env)

        async def healthy() -> dict[str, Any] | None:
            current = await item(http, dr, item_id)
            ok = current["health"] == "Normal" and (current["last_committed_seq"] or 0) >= 3
            return current if ok else None

        await eventually(healthy, timeout=90, what="healthy replication")
        filler = await asyncio.to_thread(fill, store)

        async def storage_error_shown() -> dict[str, Any] | None:
            current = await item(http, dr, item_id)
            error = current["error"] or ""
            shown = current["health"] == "Critical" and "No space left" in error
            return current if shown else None

        full = await eventually(storage_error_shown, timeout=90, what="the item shows ENOSPC")
        assert "cause:" in full["error"] and "recommendation:" in full["error"], full
        assert any("No space left" in r for r in full["health_reasons"]), full
        filler.unlink()

        async def recovered() -> dict[str, Any] | None:
            current = await item(http, dr, item_id)
            moving = (current["last_committed_seq"] or 0) > (full["last_committed_seq"] or 0) + 2
            ok = current["health"] == "Normal" and current["error"] is None and moving
            return current if ok else None

        await eventually(recovered, timeout=120, what="replication stores cycles again")
        assert plat.services["replication"].alive()
        await no_data_lost(http, dr, item_id, tmp_path)


async def test_enable_with_a_missing_disk_image_shows_the_agents_failure(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    plat.start("replication")
    dr = await two_sites(plat, http, tmp_path, copy_seconds=1)
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": "gone01", "disks": ["1MiB"]})
    vm = await vm_named(http, dr, "gone01")
    image = Path(vm["disks"][0]["path"])
    assert await asyncio.to_thread(image.is_file), vm
    await asyncio.to_thread(image.unlink)
    protected = await protect(http, dr, vm["vm_id"])

    async def failed() -> dict[str, Any] | None:
        current = await item(http, dr, protected["item_id"])
        reasons = current["health_reasons"]  # the health evaluation's, a moment after the state
        return current if current["state"] == "error" and reasons else None

    shown = await eventually(failed, timeout=30, what="the item shows the agent's failure")
    assert shown["health"] == "Critical", shown
    assert "no image file" in shown["error"] and "recommendation" in shown["error"], shown
    assert any("no image file" in r for r in shown["health_reasons"]), shown


async def state_is(
    http: httpx.AsyncClient, dr: DrSetup, item_id: str, state: str
) -> dict[str, Any] | None:
    current = await item(http, dr, item_id)
    return current if current["state"] == state else None


async def evaluated_health(http: httpx.AsyncClient, service_url: str) -> bool:
    """Whether the replication process at `service_url` has evaluated its items' health (it
    exports `dr_replication_items` from its first evaluation on)."""
    metrics = (await http.get(f"{service_url}/metrics")).text
    return any(line.startswith("dr_replication_items{") for line in metrics.splitlines())


async def test_a_dead_lettered_delta_stays_on_the_item_across_a_restart(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with scripted_item(plat, http, tmp_path, "dlq01", "hv-dlq") as (dr, agent, item_id):
        await agent.cycle(1, ev.CycleKind.INITIAL, list(range(BLOCKS)))

        async def dead_letter_shown() -> dict[str, Any] | None:
            current = await item(http, dr, item_id)
            found = [r for r in current["health_reasons"] if "wrong_partition" in r]
            return current if found and current["last_committed_seq"] == 1 else None

        await eventually(lambda: state_is(http, dr, item_id, "replicating"), what="point 1")
        await agent.send_on_another_partition(agent.started(2, ev.CycleKind.DELTA))
        await eventually(dead_letter_shown, what="the dead-lettered record on the item")

        service = plat.services["replication"]
        service.stop()
        service.start()
        await eventually(
            lambda: evaluated_health(http, service.url), what="health evaluated after restart"
        )
        after = await item(http, dr, item_id)
        assert any("wrong_partition" in r for r in after["health_reasons"]), after
        assert after["health"] == "Warning", after

        await agent.cycle(2, ev.CycleKind.DELTA, [0])

        async def cleared() -> dict[str, Any] | None:
            current = await item(http, dr, item_id)
            noted = [r for r in current["health_reasons"] if "wrong_partition" in r]
            return current if current["last_committed_seq"] == 2 and not noted else None

        await eventually(cleared, what="the next cycle commits and clears the note")

"""The replication service without a block copy (`DR_REPLICATION_KEEP_BLOCK_COPY=false`): an
item's blocks only pass through the service (verified, forwarded to its recovery host's
feed), its verification state is in PostgreSQL, and its points are on the recovery host only.

- The whole failover story (test failover, planned failover with the zero-data-loss proof,
  commit, reverse, failback) passes, and the service's store never held the item's blocks; an
  unplanned failover to an older point gets the replica rolled back, byte for byte.
- kill -9 of the service mid-cycle: after the restart the item goes on without a resync (a
  cycle whose batches the new process did not all forward is read again from the delta topic:
  tests/integration/test_feed_writer.py), no committed point is lost, and the recovery host's
  replica ends byte-identical to the source disks."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.admin.records_to_delete import RecordsToDelete
from aiokafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from kit.dr import DrSetup, item, points, protect, two_sites, vm_named
from kit.files import file_sha256
from kit.platform import Platform
from kit.poll import eventually
from kit.procs import Proc
from kit.stack import Stack
from shared import topics
from shared.kafka.admin import admin_client
from tests.e2e import test_failover_plans_e2e as plans
from tests.e2e.test_failover_e2e import failover_story
from tests.e2e.test_replication_e2e import replica_at
from tests.e2e.test_replication_faults_e2e import live_seqs, pruned_seqs, replicating_vm
from tests.e2e.test_replication_instances_e2e import another_instance, metric
from tests.support.own_platform import own_platform

pytestmark = pytest.mark.e2e

NO_COPY = {"DR_REPLICATION_KEEP_BLOCK_COPY": "false"}


@pytest.fixture
async def plat(stack: Stack, tmp_path: Path) -> AsyncIterator[Platform]:
    own = await own_platform(stack, "nocopy", tmp_path)
    try:
        yield own
    finally:
        await own.close()


def stored_items(plat: Platform) -> list[str]:
    """The items the service's replica store has a folder for (any site)."""
    root = plat.log_dir / "replica"
    return sorted(p.name for p in root.glob("*/items/*") if p.is_dir()) if root.exists() else []


async def leaf_rows(plat: Platform, item_id: str) -> int:
    conn = await asyncpg.connect(plat.database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM replication.verified_disks WHERE item_id = $1", uuid.UUID(item_id)
        )
        return count
    finally:
        await conn.close()


async def test_failover_story_without_a_block_copy(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    plat.start("replication", NO_COPY)
    dr, item_id = await failover_story(plat, http, tmp_path)
    assert item_id not in stored_items(plat), "the service stored blocks of an item it forwards"
    # its replica went with the failover: a point of it cannot be exported any more, and the
    # answer says so
    seq = max(p["cycle_seq"] for p in await points(http, dr, item_id))
    resp = await http.post(
        dr.url("replication", f"/protected-items/{item_id}/recovery-points/{seq}/verify"),
        headers=dr.bearer(dr.reader),
    )
    assert resp.status_code == 409 and "recovery host" in resp.text, resp.text


async def test_unplanned_failover_to_an_older_point_without_a_block_copy(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The recovery host's replica rolled back to an older point becomes the VM's disks
    (byte-identical to the source when that point was taken, the replica's own files): the
    same test as with a block copy, here with none to fall back on."""
    plat.start("replication", NO_COPY)
    await plans.test_unplanned_failover_to_an_older_point_rolls_the_replica_back(
        plat, http, tmp_path
    )


async def replica_is_the_source_once_writes_stop(
    http: httpx.AsyncClient, dr: DrSetup, item_id: str, root: Path
) -> tuple[int, dict[str, str]]:
    """The workload on db01 stopped: the first point after it, once the recovery host's
    replica holds it, has replica images byte-identical to the source disks. Returns the
    point and each disk's SHA-256."""
    await dr.agent_call(http, "hv-p1", "POST", "/vms/db01/workload", {"blocks_per_second": 0})
    stopped = datetime.now().astimezone()

    async def final_point() -> int | None:
        later = [
            p["cycle_seq"]
            for p in await points(http, dr, item_id)
            if datetime.fromisoformat(p["source_time"]) > stopped
        ]
        return min(later) if later else None

    seq = await eventually(final_point, timeout=60, what="a point after the writes stopped")
    await replica_at(http, dr, item_id, seq)
    images = root / "agent-hv-r1-state" / "replica" / item_id / "disks"
    disks = (await item(http, dr, item_id))["disks"]
    sources = {d["disk_id"]: file_sha256(Path(d["path"])) for d in disks}
    for disk_id, source in sources.items():
        assert file_sha256(images / f"{disk_id}.vhdx") == source, disk_id
    return seq, sources


async def test_kill_9_mid_cycle_loses_no_point_and_needs_no_resync(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    env = {**NO_COPY, "DR_CRASH_AT": "replication.blocks_stored@12"}
    dr, item_id = await replicating_vm(plat, http, tmp_path, env)
    service = plat.services["replication"]
    seen: set[int] = set()

    async def killed() -> bool:
        if service.alive():
            with contextlib.suppress(httpx.HTTPError, AssertionError):  # it may die answering
                seen.update(await live_seqs(http, dr, item_id))
            return False
        return True

    await eventually(killed, timeout=90, interval=0.3, what="kill -9 mid-cycle")
    assert service.popen is not None and service.popen.returncode == -9
    assert seen, "points were committed before the crash"
    assert await leaf_rows(plat, item_id) == 2, "the verified leaves of both disks"
    service.env.pop("DR_CRASH_AT")
    service.start()

    async def caught_up() -> dict[str, Any] | None:
        current = await item(http, dr, item_id)
        done = current["state"] == "replicating" and current["last_committed_seq"] > max(seen) + 2
        return current if done else None

    await eventually(caught_up, timeout=90, what="the item catches up after the restart")
    lost = seen - await live_seqs(http, dr, item_id) - await pruned_seqs(plat, item_id)
    assert not lost, f"committed points lost: {sorted(lost)}"
    log = await asyncio.to_thread(service.log_path.read_text)
    assert "resync required" not in log, "the interrupted cycle cost a resync"

    # writes stopped: the replica at the recovery host reaches the last point, byte for byte
    seq, sources = await replica_is_the_source_once_writes_stop(http, dr, item_id, tmp_path)
    # the point verified and exported by the recovery host, through the replication API
    resp = await http.post(
        dr.url("replication", f"/protected-items/{item_id}/recovery-points/{seq}/verify"),
        headers=dr.bearer(dr.reader),
    )
    assert resp.status_code == 200 and resp.json()["ok"], resp.text
    assert {d["disk_id"]: d["sha256"] for d in resp.json()["disks"]} == sources
    export = dr.storage("recovery", "hv-r1") / "export"
    resp = await http.post(
        dr.url("replication", f"/protected-items/{item_id}/recovery-points/{seq}/materialise"),
        json={"target_dir": str(export)},
        headers=dr.bearer(dr.operator),
    )
    assert resp.status_code == 200, resp.text
    for disk in resp.json()["disks"]:
        assert file_sha256(Path(disk["path"])) == sources[disk["disk_id"]] == disk["sha256"]
    outside = await http.post(
        dr.url("replication", f"/protected-items/{item_id}/recovery-points/{seq}/materialise"),
        json={"target_dir": str(tmp_path / "not-the-hosts")},
        headers=dr.bearer(dr.operator),
    )
    assert outside.status_code == 409 and "storage" in outside.text, outside.text
    assert item_id not in stored_items(plat)


async def committed_cycles(http: httpx.AsyncClient, proc: Proc) -> float:
    """The instance's `dr_replication_cycles_total{result="committed"}` (0 if unreachable)."""
    try:
        text = (await http.get(f"{proc.url}/metrics")).text
    except httpx.HTTPError:
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dr_replication_cycles_total" and sample.labels == {
                "result": "committed"
            }:
                return float(sample.value)
    return 0.0


async def protected_vms(http: httpx.AsyncClient, dr: DrSetup, names: list[str]) -> dict[str, str]:
    """VMs with one 1 MiB disk each on hv-p1, protected, each with a workload: item by name."""
    out = {}
    for name in names:
        await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": name, "disks": ["1MiB"]})
        vm = await vm_named(http, dr, name)
        out[name] = (await protect(http, dr, vm["vm_id"]))["item_id"]
        await dr.agent_call(
            http, "hv-p1", "POST", f"/vms/{name}/workload", {"blocks_per_second": 8}
        )
    return out


async def all_seqs(
    http: httpx.AsyncClient, dr: DrSetup, items: dict[str, str]
) -> set[tuple[str, int]]:
    return {(i, s) for i in items.values() for s in await live_seqs(http, dr, i)}


async def all_moved_past(
    http: httpx.AsyncClient, dr: DrSetup, items: dict[str, str], seen: set[tuple[str, int]]
) -> None:
    """Every item replicating with at least two points past the latest one in `seen`."""
    latest = {i: max((s for j, s in seen if j == i), default=0) for i in items.values()}

    async def moved() -> bool:
        for item_id, seq in latest.items():
            current = await item(http, dr, item_id)
            if current["state"] != "replicating" or current["last_committed_seq"] <= seq + 2:
                return False
        return True

    await eventually(moved, timeout=120, what="every item committing new points")


@pytest.mark.timeout(900)
async def test_two_instances_share_the_partitions_and_one_is_killed_mid_cycle(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Two instances with their own state roots share the delta partitions. The one that
    coordinates is killed with kill -9 in the middle of a cycle (after its 80th stored batch):
    the other takes its partitions and the coordination, no committed point is lost and new
    points keep committing; restarted, it takes partitions again, without loss; every
    replica ends byte-identical to its source, and no item needed a resync."""
    poll = {"DR_REPLICATION_STANDBY_POLL_SECONDS": "0.5"}
    first = plat.start("replication", {**NO_COPY, **poll})
    dr = await two_sites(plat, http, tmp_path, copy_seconds=1)
    second = another_instance(plat, "b", tmp_path / "b-state" / "replica")
    second.env["DR_CRASH_AT"] = "replication.blocks_stored@80"
    second.start()
    await eventually(lambda: healthy(http, second), timeout=60, what="the second instance")
    # the first instance coordinates; restarted, it leaves that to the second one
    first.stop()
    first.start()
    await eventually(lambda: healthy(http, first), timeout=60, what="the first instance again")
    assert await metric(http, second, "dr_replication_coordinator") == 1
    assert await metric(http, first, "dr_replication_coordinator") == 0
    assert await metric(http, first, "dr_replication_active") == 1

    items = await protected_vms(http, dr, [f"vm{i}" for i in range(8)])
    worked: list[float] = []
    first_worked: list[float] = []
    seen: set[tuple[str, int]] = set()

    async def killed() -> bool:
        if second.alive():
            worked.append(await committed_cycles(http, second))
            first_worked.append(await committed_cycles(http, first))
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                seen.update(await all_seqs(http, dr, items))
            # one instance's partitions hold no item yet: another VM (its key picks a partition)
            if len(worked) % 10 == 9 and min(max(worked), max(first_worked)) == 0:
                items.update(await protected_vms(http, dr, [f"vm{len(items)}"]))
            return False
        return True

    await eventually(killed, timeout=240, interval=0.5, what="kill -9 of the second instance")
    assert second.popen is not None and second.popen.returncode == -9
    assert max(worked) > 0, "the killed instance committed cycles (it had partitions)"
    assert max(first_worked) > 0, "both instances did the pipeline's work"
    seen.update(await all_seqs(http, dr, items))

    async def coordinating() -> bool:
        return await metric(http, first, "dr_replication_coordinator") == 1

    await eventually(coordinating, timeout=60, what="the first instance coordinates")
    await all_moved_past(http, dr, items, seen)
    pruned = await pruned_seqs_of(plat, items)
    lost = seen - await all_seqs(http, dr, items) - pruned
    assert not lost, f"committed points lost: {sorted(lost)}"

    # restarted: a rebalance gives it partitions again, and nothing is lost
    second.env.pop("DR_CRASH_AT")
    second.start()
    await eventually(lambda: healthy(http, second), timeout=60, what="the second instance back")
    seen.update(await all_seqs(http, dr, items))

    async def working_again() -> bool:
        return await committed_cycles(http, second) > 0

    await eventually(working_again, timeout=120, what="the restarted instance commits cycles")
    await all_moved_past(http, dr, items, seen)
    lost = seen - await all_seqs(http, dr, items) - await pruned_seqs_of(plat, items)
    assert not lost, f"committed points lost after the rebalance: {sorted(lost)}"

    # writes stopped: every replica reaches its item's last point, byte for byte
    for name in items:
        await dr.agent_call(
            http, "hv-p1", "POST", f"/vms/{name}/workload", {"blocks_per_second": 0}
        )
    stopped = datetime.now().astimezone()
    for name, item_id in items.items():

        async def final_point(item_id: str = item_id) -> int | None:
            later = [
                p["cycle_seq"]
                for p in await points(http, dr, item_id)
                if datetime.fromisoformat(p["source_time"]) > stopped
            ]
            return min(later) if later else None

        seq = await eventually(final_point, timeout=60, what=f"{name}: a point after the writes")
        await replica_at(http, dr, item_id, seq)
        current = await item(http, dr, item_id)
        images = tmp_path / "agent-hv-r1-state" / "replica" / item_id / "disks"
        for disk in current["disks"]:
            replica = await asyncio.to_thread(file_sha256, images / f"{disk['disk_id']}.vhdx")
            source = await asyncio.to_thread(file_sha256, Path(disk["path"]))
            assert replica == source, f"{name} {disk['disk_id']}"
    for proc in (first, second):
        log = await asyncio.to_thread(proc.log_path.read_text, errors="replace")
        assert "resync required" not in log, f"{proc.log_path.name}: an item resynced"


async def healthy(http: httpx.AsyncClient, proc: Proc) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        resp = await http.get(f"{proc.url}/healthz")
        return resp.status_code == 200 and resp.json()["status"] == "ok"
    return False


async def pruned_seqs_of(plat: Platform, items: dict[str, str]) -> set[tuple[str, int]]:
    return {(i, s) for i in items.values() for s in await pruned_seqs(plat, i)}


async def feed_emptied(plat: Platform, agent_id: str) -> None:
    """Every record on the host's replica feed deleted, as retention would."""
    topic = topics.physical(topics.replica_feed(agent_id), plat.prefix)
    admin = admin_client(plat.stack.kafka, request_timeout_ms=15000)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
        partitions = [p["partition"] for p in described[0]["partitions"]]
        await admin.delete_records(
            {TopicPartition(topic, p): RecordsToDelete(-1) for p in partitions}, timeout_ms=15000
        )
    finally:
        await admin.close()


async def test_a_recovery_host_down_past_its_feed_retention_catches_up(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The recovery host is down while points commit and their blocks leave its feed: back,
    it cannot apply them, reports the point it holds, and catches up by one resync of the
    blocks that differ (from its leaves and the latest point's), applied over what it holds.
    The points it never got are pruned; the replica ends byte-identical to the source."""
    dr, item_id = await replicating_vm(plat, http, tmp_path, NO_COPY)
    current = await item(http, dr, item_id)
    await replica_at(http, dr, item_id, (current["last_committed_seq"] or 0) + 2)
    dr.agents["hv-r1"].stop()
    held = (await item(http, dr, item_id))["replica_seq"]

    async def points_missed() -> bool:
        return ((await item(http, dr, item_id))["last_committed_seq"] or 0) > held + 5

    await eventually(points_missed, timeout=60, what="points committed while the host is down")
    await feed_emptied(plat, current["recovery_agent_id"])
    missed = {s for s in await live_seqs(http, dr, item_id) if s > held}
    dr.agents["hv-r1"].start()

    async def caught_up() -> dict[str, Any] | None:
        now = await item(http, dr, item_id)
        done = (
            now["state"] == "replicating"
            and now["replica_error"] is None
            and (now["replica_seq"] or 0) > max(missed)
        )
        return now if done else None

    await eventually(caught_up, timeout=120, what="the replica caught up")
    log = await asyncio.to_thread(plat.services["replication"].log_path.read_text)
    assert "replica missed points: catching up" in log
    assert "replica catch-up: resync against the replica's leaves" in log
    # the points the replica never got are gone from the list (they are nowhere)
    assert "recovery points the replica missed pruned" in log
    assert not missed & await live_seqs(http, dr, item_id)

    async def announced() -> bool:  # to the other services' read models (the outbox relays)
        return missed <= await pruned_seqs(plat, item_id)

    await eventually(announced, timeout=30, what="the missed points announced as pruned")

    # writes stopped: the replica follows the source to its last point, byte for byte
    await replica_is_the_source_once_writes_stop(http, dr, item_id, tmp_path)

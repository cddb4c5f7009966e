"""Failover end to end: real services, two sites' agents, real Kafka and PostgreSQL. The story:
test failover (byte-identical test VM on the test network; cleanup removes it; replication
untouched), refusals, planned failover with the zero-data-loss proof, commit, reverse
replication seeded from the old primary, failback; a recovery plan whose run survives kill -9
of the failover service at several steps."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.dr import (
    DrSetup,
    failback_ready,
    failover_known,
    failover_up,
    finished,
    item,
    points,
    protect,
    start,
    two_sites,
    vm_named,
)
from kit.platform import Platform
from kit.poll import eventually
from shared import topics
from tests.support.kafka import read_all

pytestmark = pytest.mark.e2e


def move(src: Path, dst: Path) -> None:
    src.rename(dst)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def vm_disk_hashes(
    http: httpx.AsyncClient, dr: DrSetup, name: str, vm: dict[str, Any]
) -> dict[str, str]:
    """SHA-256 of each disk of a VM on the recovery host as the VM reads it (a test VM's
    differencing disks through their frozen view), asked of the host agent."""
    return {
        d["id"]: (await dr.agent_call(http, "hv-r1", "GET", f"/vms/{name}/disks/{d['id']}/sha256"))[
            "sha256"
        ]
        for d in vm["disks"]
    }


async def protected_vm(
    http: httpx.AsyncClient,
    dr: DrSetup,
    name: str,
    disks: list[str] | None = None,
    ip: str = "10.10.0.150",
) -> dict[str, Any]:
    """A VM on hv-p1 with a static NIC on Corp-Primary, protected, past initial replication."""
    await dr.agent_call(
        http, "hv-p1", "POST", "/vms", {"name": name, "disks": disks or ["2MiB", "1MiB"]}
    )
    meta = dr.storage("primary", "hv-p1") / name / "vm.json"
    vm = json.loads(meta.read_text())
    vm["nics"] = [{"nic_id": "nic0", "network": "Corp-Primary", "subnet": "corp", "ip": ip}]
    meta.write_text(json.dumps(vm))
    await dr.agent_call(http, "hv-p1", "POST", f"/vms/{name}/writes", {"blocks": 20})

    async def with_nic() -> dict[str, Any] | None:
        found = await vm_named(http, dr, name)
        return found if found.get("nics") and found["nics"][0].get("network_id") else None

    discovered = await eventually(with_nic, timeout=30, what=f"{name} discovered with its NIC")
    protected = await protect(http, dr, discovered["vm_id"])

    async def ready() -> dict[str, Any] | None:
        current = await item(http, dr, protected["item_id"])
        return current if current["initial_done_at"] and current["state"] == "replicating" else None

    return await eventually(ready, timeout=90, what=f"{name}: initial replication")


async def reverse_item_states_true(platform: Platform, item_id: str) -> None:
    """The seeded reverse item's published states, in order: created waiting for its resync
    against the seed (not `replicating`), resynchronizing, and `replicating` only after the
    resync's recovery point was committed."""
    records = await read_all(platform.stack.kafka, platform.prefix + topics.REPLICATION_EVENTS)
    history: list[str] = []
    for record in records:
        env = record.json()
        if env["payload"].get("item_id") != item_id:
            continue
        if env["type"] == "ItemStateChanged":
            history.append(env["payload"]["state"])
        elif env["type"] == "RecoveryPointCreated":
            history.append(f"point:{env['payload']['kind']}")
    assert history, "no events for the reverse item"
    first_state = next(h for h in history if not h.startswith("point:"))
    assert first_state == "waiting_to_start_resync", history
    replicating = history.index("replicating")
    assert "resynchronizing" in history[:replicating], history
    assert "point:resync" in history[:replicating], history


def task_named(job: dict[str, Any], fragment: str) -> list[dict[str, Any]]:
    return [t for t in job["tasks"] if fragment in t["name"]]


async def test_failover_story(platform: Platform, http: httpx.AsyncClient, tmp_path: Path) -> None:
    await failover_story(platform, http, tmp_path)


async def failover_story(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> tuple[DrSetup, str]:
    """Test failover, cleanup, planned failover with its proof, commit, reverse, failback;
    returns the setup and the first item's id."""
    dr = await two_sites(platform, http, tmp_path, copy_seconds=1)
    failover = await failover_up(platform, http, dr)
    web = await protected_vm(http, dr, "web01")
    item_id = web["item_id"]
    recovery = dr.storage("recovery", "hv-r1")
    nets = dr.facts["networks"]

    # --- a source state captured by a point; the test VM must equal it byte for byte
    await dr.agent_call(http, "hv-p1", "POST", "/vms/web01/writes", {"blocks": 9})
    written = datetime.now().astimezone()

    async def point_after() -> dict[str, Any] | None:
        later = [
            p
            for p in await points(http, dr, item_id)
            if datetime.fromisoformat(p["source_time"]) > written
        ]
        return min(later, key=lambda p: p["cycle_seq"]) if later else None

    point = await eventually(point_after, timeout=60, what="a point after the writes")
    source = {d["disk_id"]: sha256(Path(d["path"])) for d in web["disks"]}
    await failover_known(http, dr, item_id, point["cycle_seq"])

    # refusals before anything ran: commit and reverse need a failover; readers can't start
    assert (await start(http, dr, f"/failovers/{item_id}/commit")).status_code == 409
    assert (await start(http, dr, f"/failovers/{item_id}/reverse-replicate")).status_code == 409
    assert (
        await start(http, dr, f"/failovers/{item_id}/test-failover", token=dr.reader)
    ).status_code == 403

    resp = await start(
        http,
        dr,
        f"/failovers/{item_id}/test-failover",
        {"choice": "chosen", "cycle_seq": point["cycle_seq"], "network": "create"},
    )
    assert resp.status_code == 202, resp.text
    test_job = resp.json()
    second = await start(http, dr, f"/failovers/{item_id}/test-failover")
    assert second.status_code == 409 and "already running" in second.text, second.text
    job = await finished(http, dr, test_job["job_id"])
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    view = (
        await http.get(dr.url("failover", f"/failovers/{item_id}"), headers=dr.bearer(dr.reader))
    ).json()
    assert view["failover_state"] == "testing" and view["test"]["vm_name"] == "web01-test"
    again = await start(http, dr, f"/failovers/{item_id}/test-failover")
    assert again.status_code == 409, again.text
    test_vm = json.loads((recovery / "web01-test" / "vm.json").read_text())
    # differencing disks over a frozen view of the replica (nothing copied), read through
    assert {d["file"] for d in test_vm["disks"]} == {f"{i}.avhdx" for i in source}
    replica = tmp_path / "agent-hv-r1-state" / "replica" / item_id
    assert len(list((replica / "views").glob("*.json"))) == 1
    assert await vm_disk_hashes(http, dr, "web01-test", test_vm) == source
    # the test VM's writes stay in its differencing disks: the replica takes no block of them
    await dr.agent_call(http, "hv-r1", "POST", "/vms/web01-test/writes", {"blocks": 8})
    assert await vm_disk_hashes(http, dr, "web01-test", test_vm) != source
    unknown = await http.get(
        f"{dr.agents['hv-r1'].url}/v1/vms/web01-test/disks/nope/sha256",
        headers=dr.bearer(dr.agent_credential("hv-r1")),
    )
    assert unknown.status_code == 404 and "no disk 'nope'" in unknown.text, unknown.text
    assert [n["network_id"] for n in test_vm["nics"]] == [view["test"]["network_id"]]
    assert view["test"]["network_id"].startswith("test-")
    # replication untouched: still replicating, new points keep coming
    before = (await item(http, dr, item_id))["last_committed_seq"]
    await dr.agent_call(http, "hv-p1", "POST", "/vms/web01/writes", {"blocks": 3})

    async def still_replicating() -> bool:
        now = await item(http, dr, item_id)
        return now["state"] == "replicating" and now["last_committed_seq"] > before

    await eventually(still_replicating, timeout=30, what="replication goes on during the test")

    resp = await start(
        http, dr, f"/failovers/{item_id}/test-failover-cleanup", {"notes": "drill ok"}
    )
    assert resp.status_code == 202, resp.text
    job = await finished(http, dr, resp.json()["job_id"])
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    assert not (recovery / "web01-test").exists()
    assert not list((replica / "views").glob("*.json"))  # the frozen view is released
    assert task_named(job, "delete test network")
    view = (
        await http.get(dr.url("failover", f"/failovers/{item_id}"), headers=dr.bearer(dr.reader))
    ).json()
    assert view["failover_state"] == "protected" and view["notes"][-1]["notes"] == "drill ok"

    # --- planned failover with the zero-data-loss proof, over the recovery host's replica

    async def replica_kept() -> int | None:
        return (await item(http, dr, item_id))["replica_seq"]

    await eventually(replica_kept, timeout=30, what="the recovery host's replica")
    inodes = {p.stem: p.stat().st_ino for p in (replica / "disks").glob("*.vhdx")}
    assert set(inodes) == {d["disk_id"] for d in web["disks"]}
    await dr.agent_call(http, "hv-p1", "POST", "/vms/web01/writes", {"blocks": 5})
    resp = await start(http, dr, f"/failovers/{item_id}/planned-failover")
    assert resp.status_code == 202, resp.text
    job = await finished(http, dr, resp.json()["job_id"])
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    proof = task_named(job, "prove zero data loss")[0]
    assert proof["detail"]["proven"] is True
    final_source = {d["disk_id"]: sha256(Path(d["path"])) for d in web["disks"]}
    vm = json.loads((recovery / "web01" / "vm.json").read_text())
    assert {d["id"]: sha256(recovery / "web01" / d["file"]) for d in vm["disks"]} == final_source
    # the VM's disks are the replica's images themselves (renamed, not copied), brought to
    # the final point first; the replica is consumed
    assert {d["id"]: (recovery / "web01" / d["file"]).stat().st_ino for d in vm["disks"]} == inodes
    assert not replica.exists()
    nic = vm["nics"][0]
    assert nic["network_id"] == nets["Corp-Recovery"]["network_id"] and nic["subnet"] == "corp"
    assert nic["ip_address"].startswith("10.20.0.")  # source address not in the target pool

    async def failed_over() -> bool:
        return (await item(http, dr, item_id))["state"] == "failed_over"

    await eventually(failed_over, timeout=30, what="replication shows failed_over")

    # --- commit, then reverse: the old primary's host is asked for its disks; one is gone,
    # so the job fails (nothing is reversed); back in place, the reverse is seeded from them
    resp = await start(http, dr, f"/failovers/{item_id}/commit")
    assert resp.status_code == 202, resp.text
    assert (await finished(http, dr, resp.json()["job_id"]))["state"] == "succeeded"
    disk_path = Path(web["disks"][0]["path"])
    hidden = disk_path.with_suffix(".away")
    move(disk_path, hidden)
    try:
        resp = await start(http, dr, f"/failovers/{item_id}/reverse-replicate")
        assert resp.status_code == 202, resp.text
        job = await finished(http, dr, resp.json()["job_id"])
    finally:
        move(hidden, disk_path)
    assert job["state"] == "failed", job
    assert job["error"] == "old primary unreachable: pass force_full_resync", job
    asked = task_named(job, "ask the old primary's host for its disk images")[0]
    assert asked["state"] == "succeeded"
    assert asked["detail"]["images"] == {
        d["path"]: None if d["path"] == str(disk_path) else d["size_bytes"] for d in web["disks"]
    }
    [refused] = job["failed_tasks"]
    assert refused["name"] == "web01: check the old primary's disks"
    assert refused["error"] == "old primary unreachable: pass force_full_resync"
    assert str(disk_path) in refused["cause"] and "force_full_resync" in refused["recommendation"]
    view = (
        await http.get(dr.url("failover", f"/failovers/{item_id}"), headers=dr.bearer(dr.reader))
    ).json()
    assert view["failover_state"] == "committed" and view["reversed_by"] is None, view
    # killed once the question is sent: resumed, the service asks again with the same command
    # id and the host answers as it did the first time
    failover.stop()
    failover.start(extra_env={"DR_CRASH_AT": "failover.old_disks.sent@1"})
    resp = await start(http, dr, f"/failovers/{item_id}/reverse-replicate")
    assert resp.status_code == 202, resp.text
    await eventually(lambda: _dead(failover), timeout=60, what="the failover service killed")
    failover.start(extra_env={"DR_CRASH_AT": ""})
    job = await finished(http, dr, resp.json()["job_id"])
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    assert job["restarts"] == 1
    new_item = job["result"]["items"][item_id]["new_item_id"]
    assert job["result"]["items"][item_id]["seeded"] is True
    [asked] = task_named(job, "ask the old primary's host for its disk images")
    assert asked["detail"]["images"] == {d["path"]: d["size_bytes"] for d in web["disks"]}

    # --- failback: planned failover back to the primary, then reverse again. Asked for the
    # moment the wait the demo uses says ready: nothing else in between.
    async def ready_for_failback() -> bool:
        return await failback_ready(
            http, dr.url("replication"), dr.url("failover"), new_item, dr.bearer(dr.reader)
        )

    await eventually(ready_for_failback, timeout=90, what="reverse item ready for failback")
    await reverse_item_states_true(platform, new_item)
    resp = await start(http, dr, f"/failovers/{new_item}/failback")
    assert resp.status_code == 202, resp.text
    job = await finished(http, dr, resp.json()["job_id"], timeout=180)
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    assert task_named(job, "prove zero data loss")[0]["detail"]["proven"] is True
    primary_vm = json.loads((dr.storage("primary", "hv-p1") / "web01" / "vm.json").read_text())
    assert primary_vm["state"] == "Running"
    again_item = job["result"]["items"][new_item]["new_item_id"]

    async def protected_again() -> bool:
        return (await item(http, dr, again_item))["state"] in (
            "replicating",
            "waiting_to_start_resync",
            "resynchronizing",
        )

    await eventually(protected_again, timeout=60, what="protected again primary -> recovery")
    jobs = (
        await http.get(
            dr.url("failover", "/jobs"), params={"target": item_id}, headers=dr.bearer(dr.reader)
        )
    ).json()
    assert {j["operation"] for j in jobs} >= {"test_failover", "planned_failover", "commit"}
    metrics = (await http.get(f"{platform.url('failover')}/metrics")).text
    assert 'dr_failover_jobs_total{state="succeeded",type="failback"}' in metrics
    return dr, item_id


async def test_plan_refusals_and_planned_before_initial(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr = await two_sites(platform, http, tmp_path, copy_seconds=1)
    await failover_up(platform, http, dr)
    many = [{"items": [f"00000000-0000-0000-0000-{i:012d}" for i in range(101)]}]
    resp = await start(http, dr, "/recovery-plans", {"name": "too-many", "groups": many})
    assert resp.status_code == 422 and "at most 100 protected items" in resp.text, resp.text
    resp = await start(
        http, dr, "/recovery-plans", {"name": "too-deep", "groups": [{"items": []}] * 8}
    )
    assert resp.status_code == 422 and "at most 7 groups" in resp.text, resp.text

    # a VM whose initial replication is still running: planned failover is refused
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": "big01", "disks": ["96MiB"]})
    await dr.agent_call(http, "hv-p1", "POST", "/vms/big01/writes", {"blocks": 1400})
    big = await protect(http, dr, (await vm_named(http, dr, "big01"))["vm_id"])

    async def known() -> bool:
        r = await http.get(
            dr.url("failover", f"/failovers/{big['item_id']}"), headers=dr.bearer(dr.reader)
        )
        return r.status_code == 200

    await eventually(known, timeout=30, what="item known")
    refused = await start(http, dr, f"/failovers/{big['item_id']}/planned-failover")
    assert refused.status_code == 409 and "initial replication" in refused.text, refused.text


def created_lines(log: Path, name: str) -> int:
    return sum(
        1
        for line in log.read_text(errors="replace").splitlines()
        if '"VM created"' in line
        and f'"vm": "{name}"' in line
        and '"already_existed": false' in line
    )


async def test_plan_survives_kill_9(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr = await two_sites(platform, http, tmp_path, copy_seconds=1)
    failover = await failover_up(platform, http, dr)
    items = [await protected_vm(http, dr, f"app{i}", ["1MiB"], f"10.10.0.16{i}") for i in range(3)]
    for it in items:
        await failover_known(http, dr, it["item_id"])
    script = platform.script("#!/bin/sh\necho pre-ok\n")
    groups = [
        {
            "items": [items[0]["item_id"], items[1]["item_id"]],
            "pre_actions": [
                {"action_id": "pre1", "name": "warm up", "kind": "script", "script": script}
            ],
        },
        {
            "items": [items[2]["item_id"]],
            "pre_actions": [
                {"action_id": "ok", "name": "confirm DNS", "kind": "manual", "run_on": ["test"]}
            ],
        },
    ]
    resp = await start(http, dr, "/recovery-plans", {"name": "tier", "groups": groups}, dr.admin)
    assert resp.status_code == 201, resp.text

    failover.stop()
    failover.start(extra_env={"DR_CRASH_AT": "failover.materialise.sent@2"})
    resp = await start(http, dr, "/recovery-plans/tier/test-failover", {"network": "none"})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    crashes = [
        "failover.create_vm.recorded@1",
        "failover.create_vm.done@2",
        "failover.manual.waiting@1",
    ]
    for nxt in crashes:
        await eventually(lambda: _dead(failover), timeout=60, what="the failover service killed")
        # it may die again while resuming, before it is even healthy
        failover.start(extra_env={"DR_CRASH_AT": nxt}, wait=False)
    await eventually(lambda: _dead(failover), timeout=60, what="killed while waiting")
    failover.start(extra_env={"DR_CRASH_AT": ""})

    async def waiting() -> dict[str, Any] | None:
        r = await http.get(dr.url("failover", f"/jobs/{job_id}"), headers=dr.bearer(dr.reader))
        return r.json() if r.json()["state"] == "waiting_for_input" else None

    await eventually(waiting, timeout=60, what="the plan waits for the manual action")
    denied = await start(http, dr, f"/jobs/{job_id}/approve", {"action_id": "ok"}, token=dr.reader)
    assert denied.status_code == 403
    ok = await start(http, dr, f"/jobs/{job_id}/approve", {"action_id": "ok"})
    assert ok.status_code == 200, ok.text
    job = await finished(http, dr, job_id)
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    assert job["restarts"] == 4
    assert sum("service restarted" in h["message"] for h in job["history"]) == 4
    for i in range(3):
        assert len(task_named(job, f"app{i}-test: create")) == 1
        assert (dr.storage("recovery", "hv-r1") / f"app{i}-test" / "vm.json").exists()
        assert created_lines(dr.agents["hv-r1"].log_path, f"app{i}-test") == 1
    assert len(task_named(job, "script: warm up")) == 1


async def _dead(proc: Any) -> bool:
    return not proc.alive()

"""Failover end to end, the parts the story test leaves out: an unplanned failover of an item
(no source shutdown, latest point) with its data-loss window; one to an older point over the
recovery host's replica (rolled back, handed over, byte-identical); recovery plans whose script
post-action fails (a planned run stops, an unplanned run goes on); restarting a failed job;
`drctl failover test`, `drctl job list/show` as a subprocess; the forced cleanup of old test
failovers. Real services, two sites' agents, real Kafka and PostgreSQL."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.dr import DrSetup, failover_known, failover_up, finished, item, start, two_sites
from kit.files import file_sha256
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack
from tests.e2e.test_failover_e2e import protected_vm, task_named
from tests.e2e.test_replication_e2e import point_after
from tests.support.cli import run_drctl
from tests.support.own_platform import own_platform

pytestmark = pytest.mark.e2e


async def drctl(dr: DrSetup, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """`python -m services.cli` as a subprocess, the way an operator runs it."""
    env = {
        **os.environ,
        "DR_FAILOVER_URL": dr.plat.url("failover"),
        "DR_TOKEN": token or dr.operator,
        "DR_VAULT": dr.vault_id,
    }
    return await run_drctl(env, *args, timeout=120)


async def view(http: httpx.AsyncClient, dr: DrSetup, item_id: str) -> dict[str, Any]:
    resp = await http.get(dr.url("failover", f"/failovers/{item_id}"), headers=dr.bearer(dr.reader))
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def vm_json(dr: DrSetup, site: str, host: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((dr.storage(site, host) / name / "vm.json").read_text())
    return data


def failing_script(platform: Platform, name: str) -> str:
    return platform.script("#!/bin/sh\necho checking the app\nexit 3\n", name)


async def test_unplanned_item_and_cli(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr = await two_sites(platform, http, tmp_path, copy_seconds=1)
    await failover_up(platform, http, dr)
    db = await protected_vm(http, dr, "db01", ["512KiB"], "10.10.0.171")
    item_id = db["item_id"]
    await failover_known(http, dr, item_id)

    # --- `drctl failover test --watch`: live progress until the job ends
    code, out, err = await drctl(dr, "failover", "test", item_id, "--network", "none", "--watch")
    assert code == 0, (out, err)
    assert "test_failover succeeded 100%" in out, out
    assert "db01: materialise recovery point" in out, out

    # --- `drctl job list/show`
    code, out, err = await drctl(
        dr, "job", "list", "--operation", "test_failover", "--json", token=dr.reader
    )
    assert code == 0, (out, err)
    jobs = json.loads(out)
    assert [j["target"] for j in jobs] == [item_id] and jobs[0]["state"] == "succeeded"
    job_id = jobs[0]["job_id"]
    code, out, err = await drctl(dr, "job", "show", job_id, "--json", token=dr.reader)
    assert code == 0, (out, err)
    shown = json.loads(out)
    assert shown["job_id"] == job_id and shown["state"] == "succeeded"
    assert len(shown["tasks"]) == 3 and all(t["state"] == "succeeded" for t in shown["tasks"])
    assert [h["message"] for h in shown["history"]][-1] == "finished: succeeded"
    code, out, err = await drctl(dr, "job", "show", job_id, token=dr.reader)
    assert code == 0, (out, err)
    assert "db01-test: create and start the VM" in out and "finished: succeeded" in out, out
    # a reader can't start one
    code, out, err = await drctl(dr, "failover", "test", item_id, token=dr.reader)
    assert code != 0, (out, err)
    assert (await view(http, dr, item_id))["failover_state"] == "testing"
    resp = await start(http, dr, f"/failovers/{item_id}/test-failover-cleanup", {"notes": "ok"})
    assert resp.status_code == 202, resp.text
    assert (await finished(http, dr, resp.json()["job_id"]))["state"] == "succeeded"

    # --- unplanned failover, no source shutdown, latest point
    await dr.agent_call(http, "hv-p1", "POST", "/vms/db01/writes", {"blocks": 4})
    resp = await start(
        http,
        dr,
        f"/failovers/{item_id}/unplanned-failover",
        {"shutdown_source": False, "choice": "latest"},
    )
    assert resp.status_code == 202, resp.text
    job = await finished(http, dr, resp.json()["job_id"])
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    assert not task_named(job, "shut down the source VM")  # the optional sync was off
    result = job["result"]["items"][item_id]
    assert result["state"] == "failed_over" and result["errors"] == []
    assert isinstance(result["data_loss_seconds"], float) and result["data_loss_seconds"] >= 0
    assert result["recovery_vm"] == "db01"
    recovery_vm = vm_json(dr, "recovery", "hv-r1", "db01")
    assert recovery_vm["state"] == "Running"
    assert vm_json(dr, "primary", "hv-p1", "db01")["state"] == "Running"  # source untouched
    shown = await view(http, dr, item_id)
    assert shown["failover_state"] == "failed_over"
    assert shown["failover"]["kind"] == "unplanned"
    assert shown["failover"]["data_loss_seconds"] == result["data_loss_seconds"]
    assert shown["failover"]["cycle_seq"] == result["cycle_seq"]

    async def failed_over() -> bool:
        return bool((await item(http, dr, item_id))["state"] == "failed_over")

    await eventually(failed_over, timeout=30, what="replication shows failed_over")
    # an unplanned failover is not restartable, and the item can't be failed over twice
    again = await start(http, dr, f"/jobs/{job['job_id']}/restart")
    assert again.status_code == 409, again.text
    twice = await start(http, dr, f"/failovers/{item_id}/unplanned-failover")
    assert twice.status_code == 409 and "already failed over" in twice.text, twice.text


async def test_unplanned_failover_to_an_older_point_rolls_the_replica_back(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The recovery host's replica is brought back to the chosen older point (only the
    blocks changed since are rewritten) and its images become the VM's disks: no copy."""
    dr = await two_sites(platform, http, tmp_path, copy_seconds=1)
    await failover_up(platform, http, dr)
    app = await protected_vm(http, dr, "app01", ["1MiB", "512KiB"], "10.10.0.172")
    item_id = app["item_id"]
    await failover_known(http, dr, item_id)
    sources = {d["disk_id"]: Path(d["path"]) for d in app["disks"]}

    async def point_held_after(instant: datetime) -> int:
        """A point captured after `instant`, committed and held by the recovery host."""

        async def held() -> int | None:
            seq = (await point_after(http, dr, item_id, instant))["cycle_seq"]
            current = await item(http, dr, item_id)
            return seq if (current["replica_seq"] or 0) >= seq else None

        return await eventually(held, timeout=60, what="a point held by the recovery host")

    await dr.agent_call(http, "hv-p1", "POST", "/vms/app01/writes", {"blocks": 6})
    older = await point_held_after(datetime.now().astimezone())
    at_older = {disk_id: file_sha256(path) for disk_id, path in sources.items()}  # writes stopped
    for _ in range(2):
        await dr.agent_call(http, "hv-p1", "POST", "/vms/app01/writes", {"blocks": 6})
        latest = await point_held_after(datetime.now().astimezone())
    assert latest > older
    replica = tmp_path / "agent-hv-r1-state" / "replica" / item_id
    inodes = {p.stem: p.stat().st_ino for p in (replica / "disks").glob("*.vhdx")}

    resp = await start(
        http,
        dr,
        f"/failovers/{item_id}/unplanned-failover",
        {"shutdown_source": False, "choice": "chosen", "cycle_seq": older},
    )
    assert resp.status_code == 202, resp.text
    job = await finished(http, dr, resp.json()["job_id"])
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    assert job["result"]["items"][item_id]["cycle_seq"] == older
    folder = dr.storage("recovery", "hv-r1") / "app01"
    disks = {
        d["id"]: folder / d["file"] for d in vm_json(dr, "recovery", "hv-r1", "app01")["disks"]
    }
    assert {disk_id: file_sha256(path) for disk_id, path in disks.items()} == at_older
    assert {disk_id: path.stat().st_ino for disk_id, path in disks.items()} == inodes
    assert not replica.exists()


async def test_plan_script_failure_planned_stops_unplanned_goes_on(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr = await two_sites(platform, http, tmp_path, copy_seconds=1)
    await failover_up(platform, http, dr)
    vms = [await protected_vm(http, dr, f"tier{i}", ["256KiB"], f"10.10.0.18{i}") for i in range(4)]
    ids = [v["item_id"] for v in vms]
    for item_id in ids:
        await failover_known(http, dr, item_id)
    script = failing_script(platform, f"post-{dr.vault_id[:8]}.sh")

    def groups(first: str, second: str) -> list[dict[str, Any]]:
        return [
            {
                "items": [first],
                "post_actions": [
                    {
                        "action_id": "check",
                        "name": "app check",
                        "kind": "script",
                        "script": script,
                    }
                ],
            },
            {"items": [second]},
        ]

    planned = {"name": "planned", "groups": groups(*ids[:2])}
    # only an admin creates a script action
    denied = await start(http, dr, "/recovery-plans", planned)
    assert denied.status_code == 403 and "only an admin" in denied.text, denied.text
    resp = await start(http, dr, "/recovery-plans", planned, token=dr.admin)
    assert resp.status_code == 201, resp.text
    resp = await start(
        http, dr, "/recovery-plans", {"name": "disaster", "groups": groups(*ids[2:])}, dr.admin
    )
    assert resp.status_code == 201, resp.text

    # --- planned: group 1 fails over, its post-action fails, the run stops before group 2
    resp = await start(http, dr, "/recovery-plans/planned/planned-failover")
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    job = await finished(http, dr, job_id)
    assert job["state"] == "failed", job
    assert "script app check failed: exited with status 3" in job["error"], job["error"]
    assert job["cause"] and "non-zero exit" in job["cause"]
    assert job["recommendation"] and "restart the job" in job["recommendation"]
    assert job["restartable"] is True
    assert [t["name"] for t in job["failed_tasks"]] == ["script: app check"]
    assert task_named(job, "tier0: create and start the VM")
    assert not task_named(job, "tier1")  # group 2 never started
    assert (await view(http, dr, ids[0]))["failover_state"] == "failed_over"
    assert (await view(http, dr, ids[1]))["failover_state"] == "protected"
    assert vm_json(dr, "primary", "hv-p1", "tier1")["state"] == "Running"
    # a reader can't restart it
    denied = await start(http, dr, f"/jobs/{job_id}/restart", token=dr.reader)
    assert denied.status_code == 403, denied.text

    # --- the script fixed, the failed job is restarted: done steps stand, the rest run
    platform.script("#!/bin/sh\necho app ok\n", script)
    resp = await start(http, dr, f"/jobs/{job_id}/restart")
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "in_progress" and resp.json()["run_no"] == 2
    again = await start(http, dr, f"/jobs/{job_id}/restart")
    assert again.status_code == 409, again.text  # only a failed job can be restarted
    job = await finished(http, dr, job_id)
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    assert job["error"] is None and job["restarts"] == 1 and job["run_no"] == 2
    assert len(task_named(job, "tier0: create and start the VM")) == 1  # not run twice
    assert len(task_named(job, "tier1: create and start the VM")) == 1
    script_tasks = task_named(job, "script: app check")
    assert [t["state"] for t in script_tasks] == ["succeeded"]
    assert any(h["message"].startswith("restarted by") for h in job["history"])
    assert (await view(http, dr, ids[1]))["failover_state"] == "failed_over"
    assert vm_json(dr, "recovery", "hv-r1", "tier1")["state"] == "Running"

    # --- unplanned: the same failing script, and the run goes on to group 2
    failing_script(platform, script)
    resp = await start(
        http, dr, "/recovery-plans/disaster/unplanned-failover", {"shutdown_source": False}
    )
    assert resp.status_code == 202, resp.text
    job = await finished(http, dr, resp.json()["job_id"])
    assert job["state"] == "completed_with_errors", (job["error"], job["failed_tasks"])
    assert [t["name"] for t in job["failed_tasks"]] == ["script: app check"]
    assert "exited with status 3" in (job["failed_tasks"][0]["error"] or "")
    assert job["error"] == "1 error(s); see the failed tasks" and job["cause"]
    assert job["restartable"] is False
    for item_id, name in ((ids[2], "tier2"), (ids[3], "tier3")):
        assert job["result"]["items"][item_id]["state"] == "failed_over"
        assert (await view(http, dr, item_id))["failover_state"] == "failed_over"
        assert vm_json(dr, "recovery", "hv-r1", name)["state"] == "Running"
    refused = await start(http, dr, f"/jobs/{job['job_id']}/restart")
    assert refused.status_code == 409, refused.text


async def test_old_test_failovers_are_cleaned_up_by_force(
    stack: Stack, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """`DR_FAILOVER_TEST_MAX_AGE_SECONDS` (2 weeks in the product) made small: a platform of
    its own, so no other test's test failovers are cleaned up under it."""
    log_dir = tmp_path / "platform"
    log_dir.mkdir()
    plat = await own_platform(stack, "fxclean", log_dir)
    try:
        dr = await two_sites(plat, http, tmp_path, copy_seconds=1)
        max_age = 12.0
        plat.start(
            "failover",
            {
                "DR_FAILOVER_TEST_MAX_AGE_SECONDS": str(max_age),
                "DR_FAILOVER_CLEANUP_INTERVAL_SECONDS": "0.5",
            },
        )
        await failover_up(plat, http, dr)
        web = await protected_vm(http, dr, "old01", ["256KiB"], "10.10.0.190")
        item_id = web["item_id"]
        await failover_known(http, dr, item_id)
        resp = await start(http, dr, f"/failovers/{item_id}/test-failover", {"network": "create"})
        assert resp.status_code == 202, resp.text
        test_job = await finished(http, dr, resp.json()["job_id"])
        assert test_job["state"] == "succeeded", (test_job["error"], test_job["failed_tasks"])
        shown = await view(http, dr, item_id)
        assert shown["failover_state"] == "testing"  # younger than the limit: left alone
        assert (dr.storage("recovery", "hv-r1") / "old01-test").exists()

        async def forced() -> dict[str, Any] | None:
            resp = await http.get(
                dr.url("failover", "/jobs"),
                params={"operation": "test_failover_cleanup", "target": item_id},
                headers=dr.bearer(dr.reader),
            )
            jobs = [j for j in resp.json() if j["state"] in ("succeeded", "failed")]
            return jobs[0] if jobs else None

        cleanup = await eventually(forced, timeout=max_age + 60, what="a forced cleanup job")
        assert cleanup["state"] == "succeeded", cleanup
        assert cleanup["created_by"] == "system:forced-cleanup"
        job = await finished(http, dr, cleanup["job_id"])
        assert task_named(job, "delete test VM old01-test")
        assert task_named(job, "delete test network")  # the network made for the test, too
        shown = await view(http, dr, item_id)
        assert shown["failover_state"] == "protected" and shown["test"] is None
        assert "forced cleanup" in shown["notes"][-1]["notes"]
        assert shown["notes"][-1]["test_job_id"] == test_job["job_id"]
        assert not (dr.storage("recovery", "hv-r1") / "old01-test").exists()
        # only one: the item is no longer testing, nothing more is started
        resp = await http.get(
            dr.url("failover", "/jobs"),
            params={"operation": "test_failover_cleanup"},
            headers=dr.bearer(dr.reader),
        )
        assert len(resp.json()) == 1, resp.json()
    finally:
        await plat.close()

"""Replication end to end: real agent, real services, real Kafka and PostgreSQL. A VM with two
disks is protected; for several recovery points the materialised disks are byte-identical to
copies of the source disks taken at that cycle. Enabling answers from the policy service's
prerequisite verdicts (events), never by asking it."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.dr import (
    DrSetup,
    item,
    points,
    protect,
    register_agent,
    two_sites,
    vm_named,
)
from kit.files import file_sha256
from kit.platform import Platform
from kit.poll import eventually
from shared import topics
from tests.support.kafka import wait_for_records

pytestmark = pytest.mark.e2e


async def point_after(
    http: httpx.AsyncClient, dr: DrSetup, item_id: str, instant: datetime
) -> dict[str, Any]:
    """The first committed point whose captured source state is later than `instant`."""

    async def found() -> dict[str, Any] | None:
        later = [
            p
            for p in await points(http, dr, item_id)
            if datetime.fromisoformat(p["source_time"]) > instant
        ]
        return min(later, key=lambda p: p["cycle_seq"]) if later else None

    return await eventually(found, timeout=60, what="a recovery point after the writes")


async def replica_at(http: httpx.AsyncClient, dr: DrSetup, item_id: str, seq: int) -> None:
    async def reached() -> bool:
        current = await item(http, dr, item_id)
        assert current["replica_error"] is None, current["replica_error"]
        return (current["replica_seq"] or 0) >= seq

    await eventually(reached, timeout=60, what=f"the recovery host's replica at point {seq}")


async def materialise(
    http: httpx.AsyncClient, dr: DrSetup, item_id: str, seq: int, target: Path
) -> dict[str, str]:
    resp = await http.post(
        dr.url("replication", f"/protected-items/{item_id}/recovery-points/{seq}/materialise"),
        json={"target_dir": str(target)},
        headers=dr.bearer(dr.operator),
    )
    assert resp.status_code == 200, resp.text
    return {d["disk_id"]: d["sha256"] for d in resp.json()["disks"]}


async def test_recovery_points_materialise_byte_identical(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr = await two_sites(platform, http, tmp_path, copy_seconds=1)
    vm = await dr.agent_call(
        http, "hv-p1", "POST", "/vms", {"name": "web01", "disks": ["3MiB", "2MiB"]}
    )
    await dr.agent_call(http, "hv-p1", "POST", "/vms/web01/writes", {"blocks": 40})
    discovered = await vm_named(http, dr, "web01")
    assert len(discovered["disks"]) == 2
    protected = await protect(http, dr, discovered["vm_id"])
    item_id = protected["item_id"]
    assert protected["state"] == "waiting_for_initial_replication"

    async def initial_done() -> dict[str, Any] | None:
        current = await item(http, dr, item_id)
        return current if current["initial_done_at"] and current["state"] == "replicating" else None

    current = await eventually(initial_done, timeout=60, what="initial replication")
    assert current["health"] == "Normal"
    disk_files = {d["disk_id"]: Path(d["path"]) for d in current["disks"]}
    assert all(p.exists() for p in disk_files.values()), disk_files

    expected: dict[int, dict[str, str]] = {}
    points_dir = dr.storage("recovery", "hv-r1") / "points"  # written by the recovery host
    for round_no in range(3):
        await dr.agent_call(
            http, "hv-p1", "POST", "/vms/web01/writes", {"blocks": 8 + round_no * 5}
        )
        written_at = datetime.now().astimezone()
        point = await point_after(http, dr, item_id, written_at)
        # No writes happen until the next round: the source now equals that point.
        copies = {}
        for disk_id, path in disk_files.items():
            copy = tmp_path / f"copy-{round_no}-{disk_id}.vhdx"
            shutil.copyfile(path, copy)
            copies[disk_id] = file_sha256(copy)
        got = await materialise(http, dr, item_id, point["cycle_seq"], points_dir / f"rp{round_no}")
        assert got == copies, f"point {point['cycle_seq']} differs from the source"
        expected[point["cycle_seq"]] = copies
        # The recovery host's replica reached the point with the source's roots, and its
        # images (in that agent's own state folder) are the source disks byte for byte.
        await replica_at(http, dr, item_id, point["cycle_seq"])
        replica = tmp_path / "agent-hv-r1-state" / "replica" / item_id / "disks"
        assert {d: file_sha256(replica / f"{d}.vhdx") for d in disk_files} == copies

    # Every point is still retained and still materialises to the same bytes.
    for seq, copies in expected.items():
        assert await materialise(http, dr, item_id, seq, points_dir / f"again-{seq}") == copies
        verify = await http.post(
            dr.url("replication", f"/protected-items/{item_id}/recovery-points/{seq}/verify"),
            headers=dr.bearer(dr.reader),
        )
        assert verify.status_code == 200 and verify.json()["ok"], verify.text

    detail = await item(http, dr, item_id)
    assert detail["statistics"]["successful_cycles"] >= 4
    assert detail["rpo_seconds"] is not None and detail["rpo_seconds"] < 30
    metrics = (await http.get(f"{platform.url('replication')}/metrics")).text
    assert f'dr_replication_rpo_seconds{{item_id="{item_id}",vm="web01"}}' in metrics
    assert "dr_replication_bytes_applied_total" in metrics
    assert vm["name"] == "web01"

    # Disabled with its replica deleted: the recovery host deletes its replica too.
    replica = tmp_path / "agent-hv-r1-state" / "replica" / item_id
    assert replica.exists()
    resp = await http.delete(
        dr.url("replication", f"/protected-items/{item_id}"),
        params={"delete_replica": "true"},
        headers=dr.bearer(dr.operator),
    )
    assert resp.status_code == 200, resp.text

    async def replica_gone() -> bool:
        return not replica.exists()

    await eventually(replica_gone, timeout=30, what="the replica deleted")


async def test_offline_initial_replication_is_imported_then_deltas_follow(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    export = tmp_path / "courier"
    dr = await two_sites(
        platform,
        http,
        tmp_path,
        copy_seconds=1,
        policy_settings={
            "initial_replication": "offline",
            "offline_export_path": str(export),
            "offline_import_path": str(export),
        },
    )
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": "arch01", "disks": ["2MiB"]})
    await dr.agent_call(http, "hv-p1", "POST", "/vms/arch01/writes", {"blocks": 20})
    vm = await vm_named(http, dr, "arch01")
    item_id = (await protect(http, dr, vm["vm_id"]))["item_id"]

    async def exported() -> bool:
        return any((export / item_id).glob("cycle-*.jsonl"))

    await eventually(exported, timeout=30, what="the agent's offline export")
    # Changes made after the export reach the replica by resync, not by a full copy.
    await dr.agent_call(http, "hv-p1", "POST", "/vms/arch01/writes", {"blocks": 3})
    current = await item(http, dr, item_id)
    assert current["state"] == "waiting_for_initial_replication", current["state"]
    resp = await http.post(
        dr.url("replication", f"/protected-items/{item_id}/import"),
        json={},
        headers=dr.bearer(dr.operator),
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["imported_records"] >= 3
    assert resp.json()["initial_done_at"] is not None

    written_at = datetime.now().astimezone()
    point = await point_after(http, dr, item_id, written_at)
    source = Path((await item(http, dr, item_id))["disks"][0]["path"])
    got = await materialise(
        http, dr, item_id, point["cycle_seq"], dr.storage("recovery", "hv-r1") / "rp"
    )
    assert list(got.values()) == [file_sha256(source)]
    # the imported points reached the recovery host's replica too (forwarded to its feed)
    await replica_at(http, dr, item_id, point["cycle_seq"])
    missing = await http.post(
        dr.url("replication", f"/protected-items/{item_id}/import"),
        json={"path": str(tmp_path / "nowhere")},
        headers=dr.bearer(dr.operator),
    )
    assert missing.status_code == 404 and "no exported cycles" in missing.text


def message(resp: httpx.Response) -> str:
    return str(resp.json()["error"]["message"])


async def test_enable_answers_from_the_policy_verdicts(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    disk = {"name": "os", "size": "1MiB"}
    vms = [
        {"name": "enc01", "host": "hv-fake", "disks": [{**disk, "encrypted": True}]},
        {"name": "ok01", "host": "hv-fake", "disks": [disk]},
    ]
    dr = await two_sites(
        platform, http, tmp_path, primary_hosts=("hv-fake",), primary_vms=vms, agents_on=()
    )
    await register_agent(http, platform, dr.key, "hv-fake")
    encrypted, fine = await vm_named(http, dr, "enc01"), await vm_named(http, dr, "ok01")
    base = dr.url("replication", "/protected-items")
    operator = dr.bearer(dr.operator)

    async def enable(vm_id: str) -> httpx.Response:
        return await http.post(base, json={"vm_id": vm_id}, headers=operator)

    # The policy service published its verdict: the encrypted disk fails a check.
    [verdict] = await wait_for_records(
        platform.stack.kafka,
        platform.prefix + topics.POLICY_EVENTS,
        lambda r: (
            r.json()["type"] == "PrerequisitesEvaluated"
            and r.json()["payload"]["vm_id"] == encrypted["vm_id"]
            and r.json()["payload"]["revision"] == 1
        ),
    )
    assert verdict.json()["payload"]["ok"] is False

    async def refused_by_the_verdict() -> str | None:
        resp = await enable(encrypted["vm_id"])
        assert resp.status_code == 409, resp.text
        error = message(resp)
        # The verdict of the VM before its cloud was paired may still be the latest one here.
        return error if "prerequisites not met" in error and "cloud_paired" not in error else None

    error = await eventually(refused_by_the_verdict, timeout=30, what="the verdict's refusal")
    assert "no_encrypted_disk: encrypted disks are not supported: os" in error
    assert "no_shared_disk" not in error  # only the failed checks are named

    # No verdict for a VM the policy service never saw: wait briefly, then "try again".
    resp = await enable(f"ghost-{tmp_path.name}")
    assert resp.status_code == 409 and int(resp.headers["retry-after"]) > 0
    assert "has not reached the replication service" in message(resp)
    assert "try again in a moment" in message(resp)

    # A VM whose verdict passes is protected; its protection disabled, it can be enabled again
    # at once: a verdict still saying "already protected" is waited for, never the answer.
    protected = await protect(http, dr, fine["vm_id"])
    again = await enable(fine["vm_id"])
    assert again.status_code == 409 and "already protected" in message(again)
    resp = await http.delete(f"{base}/{protected['item_id']}", headers=operator)
    assert resp.status_code == 200, resp.text
    first = await enable(fine["vm_id"])
    if first.status_code == 202:
        reenabled = first.json()
    else:
        assert first.status_code == 409, first.text
        assert "try again in a moment" in message(first), first.text
        reenabled = await protect(http, dr, fine["vm_id"])
    assert reenabled["item_id"] != protected["item_id"]

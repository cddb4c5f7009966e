"""Failover mechanics end to end, with this test acting as the failover service: it publishes
the contract's requests (`failover.events.v1`) and the recovery-host commands
(`agent.commands.v1`) and checks what a user sees: answers on `replication.events.v1`, files
on the recovery host, the inventory, protected items and their recovery points.

(a) a test-failover-like drill: a point materialised at the recovery host is byte-identical to
the source; a VM created from it shows up in the recovery site's inventory with its NICs and
goes at delete; replication goes on untouched.
(b) planned failover: shutdown ships the final cycle (synced), the replica's roots equal the
source's final roots (zero data loss), failed over, commit keeps one point.
(c) reverse replication seeded from the old primary's disks: only the differing blocks travel.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.dr import DrSetup, item, points, protect, two_sites, vm_named
from kit.files import file_sha256
from kit.platform import Platform
from kit.poll import eventually
from shared import topics
from shared.schemas import failover as fo
from shared.schemas.agent import (
    NicAttachment,
    VmCreateRequested,
    VmDeleteRequested,
    VmDisk,
    VmPowerRequested,
)
from shared.schemas.envelope import EventPayload, new_envelope
from tests.e2e.test_replication_e2e import materialise, point_after
from tests.support.kafka import Record, produce, read_all, wait_for_records

pytestmark = pytest.mark.e2e


class Failover:
    """What the failover service would publish, and the answers it would wait for."""

    def __init__(self, platform: Platform, dr: DrSetup) -> None:
        self.platform, self.dr = platform, dr
        self.kafka = platform.stack.kafka

    def agent_id(self, host: str) -> uuid.UUID:
        return uuid.UUID(self.dr.agent_identity(host)["producer_id"])

    async def publish(self, topic: str, payload: EventPayload, key: str) -> None:
        env = new_envelope(
            payload, vault_id=uuid.UUID(self.dr.vault_id), producer_id="service:failover"
        )
        await produce(self.kafka, self.platform.prefix + topic, env.to_bytes(), key=key)

    async def request(self, payload: EventPayload, key: uuid.UUID) -> None:
        await self.publish(topics.FAILOVER_EVENTS, payload, str(key))

    async def command(self, host: str, payload: EventPayload) -> dict[str, Any]:
        await self.publish(topics.AGENT_COMMANDS, payload, str(self.agent_id(host)))
        command_id = str(payload.command_id)  # type: ignore[attr-defined]
        found = await wait_for_records(
            self.kafka,
            self.platform.prefix + topics.AGENT_EVENTS,
            lambda r: (
                r.json()["type"] == "CommandCompleted"
                and r.json()["payload"]["command_id"] == command_id
            ),
            timeout=60,
        )
        result: dict[str, Any] = found[0].json()["payload"]
        return result

    async def answers(self, request_id: uuid.UUID, count: int = 1) -> list[dict[str, Any]]:
        def match(r: Record) -> bool:
            doc = r.json()
            return doc["type"] in (
                "RecoveryPointMaterialised",
                "RecoveryPointMaterialiseFailed",
            ) and doc["payload"]["request_id"] == str(request_id)

        found = await wait_for_records(
            self.kafka, self.platform.prefix + topics.REPLICATION_EVENTS, match, count=count,
            timeout=60,
        )  # fmt: skip
        return [{"type": r.json()["type"], **r.json()["payload"]} for r in found]

    async def materialise(
        self, item_id: uuid.UUID, target: Path, key: uuid.UUID | None = None, **kw: Any
    ) -> tuple[fo.RecoveryPointMaterialiseRequested, dict[str, Any]]:
        req = fo.RecoveryPointMaterialiseRequested(
            request_id=uuid.uuid4(), item_id=item_id, target_dir=str(target), **kw
        )
        await self.request(req, key or item_id)
        return req, (await self.answers(req.request_id))[0]


def create_command(
    agent_id: uuid.UUID, name: str, vm_id: str, answer: dict[str, Any], nets: Any
) -> VmCreateRequested:
    return VmCreateRequested(
        command_id=uuid.uuid4(),
        agent_id=agent_id,
        vm_id=vm_id,
        vm_name=name,
        disks=[
            VmDisk(disk_id=d["disk_id"], file=Path(d["path"]).name, size_bytes=d["size_bytes"])
            for d in answer["disks"]
        ],
        nics=[
            NicAttachment(
                nic_id="nic0",
                network_id=nets["Corp-Recovery"]["network_id"],
                subnet="corp",
                ip_mode="static",
                ip_address="10.20.0.150",
            )
        ],
    )


def mtime(path: str) -> int:
    return Path(path).stat().st_mtime_ns


async def inventory_vm(http: httpx.AsyncClient, dr: DrSetup, name: str) -> list[dict[str, Any]]:
    resp = await http.get(
        dr.url("inventory", "/vms"), params={"name": name}, headers=dr.bearer(dr.reader)
    )
    assert resp.is_success, resp.text
    return [v for v in resp.json().get("items", []) if v["name"] == name]


async def test_failover_mechanics(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    # VM names unlike other tests': the providers derive VM ids from site and name, and the
    # replication service's VM read model is keyed by VM id alone.
    dr = await two_sites(platform, http, tmp_path, copy_seconds=1)
    fail = Failover(platform, dr)
    recovery = dr.storage("recovery", "hv-r1")
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": "fo01", "disks": ["3MiB", "2MiB"]})
    await dr.agent_call(http, "hv-p1", "POST", "/vms/fo01/writes", {"blocks": 40})
    source_vm = await vm_named(http, dr, "fo01")
    item_id = uuid.UUID((await protect(http, dr, source_vm["vm_id"]))["item_id"])

    async def replicating() -> dict[str, Any] | None:
        current = await item(http, dr, str(item_id))
        return current if current["state"] == "replicating" else None

    current = await eventually(replicating, timeout=60, what="initial replication")
    sources = {d["disk_id"]: Path(d["path"]) for d in current["disks"]}
    full_blocks = sum(-(-p.stat().st_size // 65536) for p in sources.values())

    # (a) ---------------------------------------------------------------- a drill
    await dr.agent_call(http, "hv-p1", "POST", "/vms/fo01/writes", {"blocks": 10})
    after = await point_after(http, dr, str(item_id), datetime.now().astimezone())
    copies = {disk_id: file_sha256(path) for disk_id, path in sources.items()}  # writes stopped
    req, answer = await fail.materialise(item_id, recovery / "fo01-test")
    assert answer["type"] == "RecoveryPointMaterialised", answer
    assert answer["cycle_seq"] >= after["cycle_seq"]
    assert {d["disk_id"]: d["sha256"] for d in answer["disks"]} == copies
    for disk in answer["disks"]:
        assert file_sha256(Path(disk["path"])) == disk["sha256"]
        assert Path(disk["path"]).parent == recovery / "fo01-test"
    mtimes = {d["path"]: mtime(d["path"]) for d in answer["disks"]}
    await fail.request(req, item_id)  # the same request id again: answered again, not redone
    first, second = await fail.answers(req.request_id, count=2)
    assert first == second
    assert {p: mtime(p) for p in mtimes} == mtimes
    # a copy is written by the recovery host (the service keeps no block copy), into its own
    # storage only
    _, outside = await fail.materialise(item_id, Path("/var/tmp") / uuid.uuid4().hex)
    assert outside["type"] == "RecoveryPointMaterialiseFailed"
    assert "is not a folder in this host's storage" in outside["error"], outside
    _, unknown = await fail.materialise(
        item_id, recovery / "nope", choice=fo.PointChoice.CHOSEN, cycle_seq=10_000
    )
    assert "10000 is not retained" in unknown["error"]

    r1 = fail.agent_id("hv-r1")
    nets = dr.facts["networks"]
    created = await fail.command("hv-r1", create_command(r1, "fo01-test", "t-1", answer, nets))
    assert created["outcome"] == "succeeded", created
    assert created["result"]["vm"]["name"] == "fo01-test"

    async def in_inventory() -> dict[str, Any] | None:
        found = await inventory_vm(http, dr, "fo01-test")
        return found[0] if found and found[0]["nics"] else None

    test_vm = await eventually(in_inventory, timeout=30, what="the test VM in the inventory")
    assert test_vm["cloud_id"] == dr.facts["clouds"]["Gold-Recovery"]["cloud_id"]
    nic = test_vm["nics"][0]
    assert (nic["network_id"], nic["subnet"], nic["ip_mode"], nic["ip_address"]) == (
        nets["Corp-Recovery"]["network_id"],
        "corp",
        "static",
        "10.20.0.150",
    )
    assert len(test_vm["disks"]) == 2
    deleted = await fail.command(
        "hv-r1", VmDeleteRequested(command_id=uuid.uuid4(), agent_id=r1, vm_name="fo01-test")
    )
    assert deleted["outcome"] == "succeeded" and deleted["result"]["deleted"] is True

    async def gone() -> bool:
        return not await inventory_vm(http, dr, "fo01-test")

    await eventually(gone, timeout=30, what="the test VM gone from the inventory")
    assert not (recovery / "fo01-test").exists()
    seq_then = (await item(http, dr, str(item_id)))["last_committed_seq"]

    async def moved_on() -> dict[str, Any] | None:
        now = await item(http, dr, str(item_id))
        return now if now["last_committed_seq"] > seq_then + 1 else None

    untouched = await eventually(moved_on, timeout=30, what="replication going on")
    assert untouched["state"] == "replicating" and untouched["health"] == "Normal"

    # (b) ---------------------------------------------------------------- planned failover
    await dr.agent_call(http, "hv-p1", "POST", "/vms/fo01/writes", {"blocks": 6})
    p1 = fail.agent_id("hv-p1")
    shutdown = await fail.command(
        "hv-p1",
        VmPowerRequested(
            command_id=uuid.uuid4(), agent_id=p1, vm_id=source_vm["vm_id"], action="shutdown"
        ),
    )
    assert shutdown["outcome"] == "succeeded", shutdown
    final = shutdown["result"]["final_cycle"]

    async def synced() -> dict[str, Any] | None:
        now = await item(http, dr, str(item_id))
        return now if now["state"] == "synced" else None

    assert (await eventually(synced, timeout=60, what="final cycle"))["last_committed_seq"] == (
        final["cycle_seq"]
    )
    finals = {disk_id: file_sha256(path) for disk_id, path in sources.items()}  # the VM is off
    _, answer = await fail.materialise(item_id, recovery / "fo01")
    assert answer["type"] == "RecoveryPointMaterialised", answer
    assert answer["cycle_seq"] == final["cycle_seq"]
    assert {d["disk_id"]: d["merkle_root"] for d in answer["disks"]} == final["roots"]
    assert {d["disk_id"]: d["sha256"] for d in answer["disks"]} == finals  # zero data loss
    created = await fail.command("hv-r1", create_command(r1, "fo01", "fo01-r", answer, nets))
    assert created["outcome"] == "succeeded", created
    await fail.request(
        fo.ItemFailedOver(
            item_id=item_id,
            kind=fo.FailoverKind.PLANNED,
            cycle_seq=final["cycle_seq"],
            recovery_vm_name="fo01",
            recovery_agent_id=r1,
        ),
        item_id,
    )

    async def failed_over() -> dict[str, Any] | None:
        now = await item(http, dr, str(item_id))
        return now if now["state"] == "failed_over" else None

    await eventually(failed_over, timeout=30, what="item failed over")

    async def source_stopped() -> bool:
        items = await dr.agent_call(http, "hv-p1", "GET", "/items")
        return not any(i["item_id"] == str(item_id) for i in items)

    await eventually(source_stopped, timeout=30, what="the source agent stopped replicating")
    assert len(await points(http, dr, str(item_id))) > 1
    await fail.request(
        fo.ItemFailoverCommitted(item_id=item_id, cycle_seq=final["cycle_seq"]), item_id
    )

    async def committed() -> list[dict[str, Any]] | None:
        live = await points(http, dr, str(item_id))
        return live if len(live) == 1 else None

    live = await eventually(committed, timeout=30, what="commit keeps one point")
    assert live[0]["cycle_seq"] == final["cycle_seq"]

    # (c) ---------------------------------------------------------------- reverse replication
    await dr.agent_call(http, "hv-r1", "POST", "/vms/fo01/writes", {"blocks": 5})
    new_item = uuid.uuid4()
    reverse = fo.ReverseReplicationRequested(
        request_id=uuid.uuid4(),
        old_item_id=item_id,
        new_item_id=new_item,
        vm_id="fo01-r",
        vm_name="fo01",
        source_agent_id=r1,
        source_site="recovery",
        target_site="primary",
        disks=[
            fo.ReverseDisk(disk_id=d["disk_id"], path=d["path"], size_bytes=d["size_bytes"])
            for d in answer["disks"]
        ],
        seed_disks=[
            fo.SeedDisk(disk_id=disk_id, path=str(path)) for disk_id, path in sources.items()
        ],
    )
    await fail.request(reverse, item_id)

    async def reverse_replicating() -> dict[str, Any] | None:
        resp = await http.get(
            dr.url("replication", f"/protected-items/{new_item}"), headers=dr.bearer(dr.reader)
        )
        now = resp.json() if resp.is_success else {}
        return now if now.get("state") == "replicating" else None

    back = await eventually(reverse_replicating, timeout=90, what="reverse replication")
    assert (back["source_site"], back["target_site"]) == ("recovery", "primary")
    assert back["target_cloud_id"] == dr.facts["clouds"]["Gold-Primary"]["cloud_id"]
    old = await item(http, dr, str(item_id))
    assert old["state"] == "not_enabled"
    new_points = sorted(await points(http, dr, str(new_item)), key=lambda p: p["cycle_seq"])
    assert [(p["cycle_seq"], p["kind"]) for p in new_points[:2]] == [(1, "initial"), (2, "resync")]
    resync = new_points[1]
    assert resync["changed_blocks"] <= 5 < full_blocks  # only what the recovery VM wrote
    assert resync["bytes"] <= 5 * 65536
    recovered = {d["disk_id"]: file_sha256(Path(d["path"])) for d in answer["disks"]}
    primary = dr.storage("primary", "hv-p1")  # the reverse item's recovery host
    assert await materialise(http, dr, str(new_item), 2, primary / "back") == recovered

    # The same request again: no second effect (a later request on the same partition is
    # answered, so the repeat was consumed before it).
    await fail.request(reverse, item_id)
    _, marker = await fail.materialise(new_item, primary / "marker", key=item_id)
    assert marker["type"] == "RecoveryPointMaterialised"
    events = await read_all(fail.kafka, platform.prefix + topics.REPLICATION_EVENTS)
    enabled = [
        r
        for r in events
        if r.json()["type"] == "ProtectionEnabled"
        and r.json()["payload"]["item_id"] == str(new_item)
    ]
    assert len(enabled) == 1
    listed = await http.get(dr.url("replication", "/protected-items"), headers=dr.bearer(dr.reader))
    assert [i["item_id"] for i in listed.json() if i["vm_name"] == "fo01"] == [str(new_item)]

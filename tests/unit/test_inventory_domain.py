"""Inventory rules: stale sequences, snapshot/change plans by content hash, snapshot checks,
and the events announcing each difference."""

from __future__ import annotations

import uuid

from services.inventory.domain import (
    Key,
    events_of,
    is_stale,
    merge_parts,
    plan_change,
    plan_snapshot,
    snapshot_problems,
)
from shared.schemas.inventory import (
    Change,
    Cloud,
    Disk,
    Host,
    Inventory,
    Kind,
    Nic,
    Removals,
    Vm,
    VmChanged,
    VmNetwork,
    content_hash,
    object_id_of,
)

PROVIDER = uuid.uuid4()


def vm(name: str, cpu: int = 2, host: str = "h1", network: str | None = "n1") -> Vm:
    return Vm(
        vm_id=f"vm-{name}",
        name=name,
        cloud_id="c1",
        host_id=host,
        cpu_count=cpu,
        disks=[Disk(disk_id=f"d-{name}", name="os.vhdx", size_bytes=2**30)],
        nics=[Nic(nic_id=f"nic-{name}", network_id=network)],
    )


def site(*vms: Vm) -> Inventory:
    return Inventory(
        networks=[VmNetwork(network_id="n1", name="Corp")],
        clouds=[Cloud(cloud_id="c1", name="Gold", host_groups=["HG"])],
        hosts=[Host(host_id="h1", name="hv1", cloud_id="c1", host_group="HG", os_version="2022")],
        vms=list(vms),
    )


def stored(inventory: Inventory) -> dict[Key, str]:
    return {(k, object_id_of(o)): content_hash(o) for k, o in inventory.objects()}


def test_stale_is_no_newer_than_the_last_applied() -> None:
    assert not is_stale(None, 0)
    assert not is_stale(5, 6)
    assert is_stale(5, 5)
    assert is_stale(5, 4)


def test_first_snapshot_adds_everything_in_dependency_order() -> None:
    plan = plan_snapshot({}, site(vm("a"), vm("b")))
    assert [(u.kind, u.change) for u in plan.upserts] == [
        (Kind.NETWORK, Change.ADDED),
        (Kind.CLOUD, Change.ADDED),
        (Kind.HOST, Change.ADDED),
        (Kind.VM, Change.ADDED),
        (Kind.VM, Change.ADDED),
    ]
    assert plan.removals == []
    assert plan.tally()[(Kind.VM, Change.ADDED)] == 2


def test_unchanged_snapshot_plans_nothing() -> None:
    inventory = site(vm("a"), vm("b"))
    assert plan_snapshot(stored(inventory), inventory).empty


def test_snapshot_writes_only_differences_and_removes_what_is_gone() -> None:
    before = site(vm("a"), vm("b"), vm("c"))
    after = site(vm("a"), vm("b", cpu=8), vm("d"))
    plan = plan_snapshot(stored(before), after)
    assert [(u.object_id, u.change) for u in plan.upserts] == [
        ("vm-b", Change.CHANGED),
        ("vm-d", Change.ADDED),
    ]
    assert plan.removals == [(Kind.VM, "vm-c")]


def test_removals_go_vms_first_networks_last() -> None:
    plan = plan_snapshot(stored(site(vm("a"))), Inventory())
    assert [k for k, _ in plan.removals] == [Kind.VM, Kind.HOST, Kind.CLOUD, Kind.NETWORK]


def test_change_applies_listed_objects_only() -> None:
    existing = stored(site(vm("a"), vm("b")))
    plan = plan_change(
        existing,
        Inventory(vms=[vm("a"), vm("b", cpu=4), vm("new")]),
        Removals(vms=["vm-a", "vm-unknown"]),
    )
    assert [(u.object_id, u.change) for u in plan.upserts] == [
        ("vm-b", Change.CHANGED),
        ("vm-new", Change.ADDED),
    ]
    # vm-a is both upserted and removed: the upsert wins; an unknown id is nothing to remove
    assert plan.removals == []
    plan = plan_change(existing, Inventory(), Removals(vms=["vm-a"], hosts=["h1"]))
    assert plan.removals == [(Kind.VM, "vm-a"), (Kind.HOST, "h1")]
    assert plan_change(existing, Inventory(vms=[vm("a")]), Removals()).empty


def test_snapshot_problems() -> None:
    assert snapshot_problems(site(vm("a"))) == []
    problems = snapshot_problems(
        site(vm("a", host="nohost"), vm("b", network="nonet"), vm("b"))
        .model_copy(update={"hosts": [*site().hosts, Host(
            host_id="h2", name="hv2", cloud_id="nocloud", host_group="HG", os_version="2022"
        )]})
    )  # fmt: skip
    assert "vm id vm-b appears 2 times" in problems
    assert "host hv2: cloud nocloud is not in the snapshot" in problems
    assert "VM a: host nohost is not in the snapshot" in problems
    assert "VM b: network nonet is not in the snapshot" in problems


def test_merge_parts() -> None:
    whole = site(vm("a"), vm("b"))
    parts = [Inventory(networks=whole.networks, clouds=whole.clouds), Inventory(
        hosts=whole.hosts, vms=whole.vms[:1]), Inventory(vms=whole.vms[1:])]  # fmt: skip
    assert merge_parts(parts) == whole


def test_events_carry_the_object_or_none_when_removed() -> None:
    plan = plan_snapshot(stored(site(vm("a"))), site(vm("b")))
    events = events_of(plan, PROVIDER, "primary")
    assert [type(e) for e in events] == [VmChanged, VmChanged]
    added, removed = events
    assert isinstance(added, VmChanged) and isinstance(removed, VmChanged)
    assert (added.change, added.vm_id, added.vm) == (Change.ADDED, "vm-b", vm("b"))
    assert (removed.change, removed.vm_id, removed.vm) == (Change.REMOVED, "vm-a", None)
    assert (removed.provider_id, removed.site) == (PROVIDER, "primary")
    first = events_of(plan_snapshot({}, site()), PROVIDER, "primary")
    assert [type(e).__name__ for e in first][:2] == ["NetworkChanged", "CloudChanged"]

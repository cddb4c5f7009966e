"""Pairing, network-mapping and prerequisite rules and the failed-over NIC target, as pure
functions."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from services.policy import domain
from services.policy.domain import (
    CheckStatus,
    CloudFacts,
    NetworkFacts,
    PairingFacts,
    ProviderFacts,
)
from shared.schemas.inventory import Disk, IpMode, Nic, StaticPool, Subnet, Vm, VmNetwork
from shared.schemas.policy import ReplicationPolicySettings

PROVIDER = uuid.uuid4()


def cloud(cloud_id: str, site: str, **kw: Any) -> CloudFacts:
    return CloudFacts(
        cloud_id=cloud_id,
        name=kw.get("name", cloud_id),
        site=site,
        provider_id=PROVIDER,
        host_groups=kw.get("host_groups", ("hg1",)),
        capacity_vms=kw.get("capacity_vms", 10),
    )


def provider(state: str | None = "Connected", active: bool = True) -> ProviderFacts:
    return ProviderFacts(PROVIDER, "vmm-b", "recovery", active, state)


def pairing(source: str = "src", target: str = "tgt", **kw: Any) -> PairingFacts:
    return PairingFacts(
        pairing_id=kw.get("pairing_id", uuid.uuid4()),
        source_cloud_id=source,
        source_site=kw.get("source_site", "primary"),
        target_cloud_id=target,
        target_site=kw.get("target_site", "recovery"),
        policy_id=kw.get("policy_id", uuid.uuid4()),
    )


def check_pairing(**overrides: Any) -> None:
    args: dict[str, Any] = {
        "source_cloud_id": "src",
        "target_cloud_id": "tgt",
        "source": cloud("src", "primary"),
        "target": cloud("tgt", "recovery"),
        "target_provider": provider(),
        "host_os_versions": {"2022"},
        "policy_name": "gold",
        "policy": ReplicationPolicySettings(),
        "existing": [],
    }
    args.update(overrides)
    domain.check_pairing(**args)


# ------------------------------------------------------------------------------ pairings


def test_valid_pairing_passes() -> None:
    check_pairing()
    check_pairing(host_os_versions=set())  # no hosts discovered yet: nothing to compare
    check_pairing(policy=ReplicationPolicySettings(target_host_os_version="2022"))


def test_same_cloud_refused() -> None:
    with pytest.raises(domain.Invalid, match=r"same cloud 'src'.*single-site setup needs"):
        check_pairing(target_cloud_id="src", target=cloud("src", "primary"))


def test_single_site_with_two_clouds_is_fine() -> None:
    check_pairing(target=cloud("tgt", "primary"))


@pytest.mark.parametrize("side", ["source", "target"])
def test_unknown_cloud_refused(side: str) -> None:
    with pytest.raises(domain.NotFound, match=f"{side} cloud '.*' is not in this vault"):
        check_pairing(**{side: None})


@pytest.mark.parametrize("side", ["source", "target"])
def test_cloud_without_host_groups_refused(side: str) -> None:
    site = "primary" if side == "source" else "recovery"
    bare = cloud("src" if side == "source" else "tgt", site, host_groups=())
    with pytest.raises(domain.Conflict, match=f"{side} cloud .* contains no host groups"):
        check_pairing(**{side: bare})


@pytest.mark.parametrize(
    ("existing_source", "existing_target", "side"),
    [("src", "other", "source"), ("other", "src", "target"), ("x", "tgt", "target")],
)
def test_cloud_in_at_most_one_pairing(
    existing_source: str, existing_target: str, side: str
) -> None:
    existing = [pairing(existing_source, existing_target)]
    with pytest.raises(domain.Conflict, match=f"already in pairing .* as {side}"):
        check_pairing(existing=existing)


def test_target_provider_must_be_registered() -> None:
    with pytest.raises(domain.Conflict, match="no site provider is registered for the target"):
        check_pairing(target_provider=None)
    with pytest.raises(domain.Conflict, match="no site provider is registered for the target"):
        check_pairing(target_provider=provider(active=False))


@pytest.mark.parametrize("state", ["Disconnected", None])
def test_target_provider_must_be_connected(state: str | None) -> None:
    with pytest.raises(domain.Conflict, match="must be Connected"):
        check_pairing(target_provider=provider(state))


def test_hosts_must_run_one_os_version() -> None:
    with pytest.raises(domain.Conflict, match=r"different OS versions \(2019, 2022\)"):
        check_pairing(host_os_versions={"2022", "2019"})


def test_hosts_must_match_policy_os_version() -> None:
    policy = ReplicationPolicySettings(target_host_os_version="2019")
    with pytest.raises(domain.Conflict, match=r"targets host OS version '2019'.*run '2022'"):
        check_pairing(policy=policy)


def test_unpair_refused_while_protected() -> None:
    p = pairing()
    domain.check_unpair(p, 0)
    with pytest.raises(domain.Conflict, match="2 VM\\(s\\) of source cloud 'src' are protected"):
        domain.check_unpair(p, 2)


def test_policy_delete_refused_while_used() -> None:
    domain.check_policy_deletable("gold", [])
    with pytest.raises(domain.Conflict, match="used by 1 cloud pairing"):
        domain.check_policy_deletable("gold", [pairing()])


# ------------------------------------------------------------------------------ mappings


def check_mapping(**overrides: Any) -> None:
    args: dict[str, Any] = {
        "source_network_id": "net-a",
        "target_network_id": "net-b",
        "source": NetworkFacts("net-a", "corp", "primary"),
        "target": NetworkFacts("net-b", "corp-dr", "recovery"),
        "pairings": [pairing()],
        "existing": None,
    }
    args.update(overrides)
    domain.check_mapping(**args)


def test_valid_mapping_passes() -> None:
    check_mapping()


def test_mapping_same_network_refused() -> None:
    with pytest.raises(domain.Invalid, match="same network"):
        check_mapping(target_network_id="net-a")


@pytest.mark.parametrize("side", ["source", "target"])
def test_mapping_unknown_network(side: str) -> None:
    with pytest.raises(domain.NotFound, match=f"{side} network .* is not in this vault"):
        check_mapping(**{side: None})


def test_mapping_needs_a_pairing_between_the_sites() -> None:
    with pytest.raises(domain.Conflict, match="no cloud pairing goes from site 'primary'"):
        check_mapping(pairings=[])
    with pytest.raises(domain.Conflict, match="no cloud pairing goes from site 'recovery'"):
        check_mapping(
            source=NetworkFacts("net-a", "corp", "recovery"),
            target=NetworkFacts("net-b", "corp-dr", "primary"),
        )


def test_one_mapping_per_source_network() -> None:
    with pytest.raises(domain.Conflict, match="already mapped by mapping"):
        check_mapping(existing=uuid.uuid4())


# ------------------------------------------------------------------------------ prerequisites


def vm(**kw: Any) -> Vm:
    data: dict[str, Any] = {
        "vm_id": "vm-1",
        "name": "web01",
        "cloud_id": "src",
        "host_id": "h1",
        "disks": [{"disk_id": "d0", "name": "os.vhdx", "size_bytes": 2**30}],
        "nics": [{"nic_id": "n0", "network_id": "net-a"}],
    }
    data.update(kw)
    return Vm.model_validate(data)


def checks(v: Vm | None, **overrides: Any) -> dict[str, domain.Check]:
    args: dict[str, Any] = {
        "pairing": pairing(),
        "mapped_networks": {"net-a": "net-b"},
        "protected": False,
        "target": cloud("tgt", "recovery", capacity_vms=5),
        "protected_in_target": 0,
    }
    args.update(overrides)
    result = domain.prerequisite_checks("vm-1", v, **args)
    return {c.rule: c for c in result}


def status(v: Vm | None, rule: str, **overrides: Any) -> tuple[CheckStatus, str]:
    c = checks(v, **overrides)[rule]
    return c.status, c.message


def test_all_prerequisites_pass() -> None:
    result = checks(vm())
    assert set(result) == {
        "vm_exists",
        "cloud_paired",
        "disk_count",
        "no_shared_disk",
        "no_encrypted_disk",
        "networks_mapped",
        "not_protected",
        "target_capacity",
    }
    assert all(c.status is CheckStatus.PASS for c in result.values())
    assert domain.prerequisites_ok(list(result.values()))


def test_vm_missing() -> None:
    result = domain.prerequisite_checks(
        "ghost",
        None,
        pairing=None,
        mapped_networks={},
        protected=False,
        target=None,
        protected_in_target=0,
    )
    assert [(c.rule, c.status) for c in result] == [("vm_exists", CheckStatus.FAIL)]
    assert "'ghost' is not in this vault's inventory" in result[0].message
    assert not domain.prerequisites_ok(result)


def test_cloud_not_paired() -> None:
    st, msg = status(vm(), "cloud_paired", pairing=None, target=None)
    assert st is CheckStatus.FAIL and "not the source of a cloud pairing" in msg
    st, msg = status(vm(), "target_capacity", pairing=None, target=None)
    assert st is CheckStatus.FAIL and "not paired" in msg


def disks(n: int, **kw: Any) -> list[Disk]:
    return [Disk(disk_id=f"d{i}", name=f"d{i}.vhdx", size_bytes=2**30, **kw) for i in range(n)]


def test_disk_count() -> None:
    assert status(vm(disks=disks(16)), "disk_count")[0] is CheckStatus.PASS
    st, msg = status(vm(disks=disks(17)), "disk_count")
    assert st is CheckStatus.FAIL and "17 disks; at most 16" in msg


def test_shared_disk() -> None:
    st, msg = status(vm(disks=disks(1, shared=True)), "no_shared_disk")
    assert st is CheckStatus.FAIL and "shared (cluster) disks are not supported: d0.vhdx" in msg


def test_encrypted_disk() -> None:
    st, msg = status(vm(disks=disks(1, encrypted=True)), "no_encrypted_disk")
    assert st is CheckStatus.FAIL and "encrypted disks are not supported: d0.vhdx" in msg


def test_unmapped_network_is_a_warning() -> None:
    result = checks(vm(), mapped_networks={})
    assert result["networks_mapped"].status is CheckStatus.WARNING
    assert "connected to no network" in result["networks_mapped"].message
    assert domain.prerequisites_ok(list(result.values()))
    unconnected = vm(nics=[{"nic_id": "n0"}])
    assert status(unconnected, "networks_mapped", mapped_networks={})[0] is CheckStatus.PASS


def test_already_protected() -> None:
    st, msg = status(vm(), "not_protected", protected=True)
    assert st is CheckStatus.FAIL and "already protected" in msg


def test_target_capacity() -> None:
    assert status(vm(), "target_capacity", protected_in_target=4)[0] is CheckStatus.PASS
    st, msg = status(vm(), "target_capacity", protected_in_target=5)
    assert st is CheckStatus.FAIL and "is full: capacity 5 VMs, 5 already protected" in msg


# ------------------------------------------------------------------------------ failover NIC


def network(*subnets: Subnet) -> VmNetwork:
    return VmNetwork(network_id="net-b", name="corp-dr", subnets=list(subnets))


POOL = StaticPool(start="10.1.0.10", end="10.1.0.12")
APP = Subnet(name="app", cidr="10.1.0.0/24", static_pool=POOL)
WEB = Subnet(
    name="web", cidr="10.2.0.0/24", static_pool=StaticPool(start="10.2.0.5", end="10.2.0.6")
)


def static_nic(ip: str = "10.1.0.11", subnet: str = "app") -> Nic:
    return Nic(nic_id="n0", network_id="net-a", subnet=subnet, ip_mode=IpMode.STATIC, ip_address=ip)


def test_unmapped_nic_is_not_connected() -> None:
    target = domain.failover_nic_target(static_nic(), None)
    assert not target.connected and target.network_id is None and "unmapped" in target.note
    bare = domain.failover_nic_target(Nic(nic_id="n1"), network(APP))
    assert not bare.connected and "not connected" in bare.note


def test_same_named_subnet_else_first() -> None:
    assert domain.failover_nic_target(static_nic(), network(WEB, APP)).subnet == "app"
    other = domain.failover_nic_target(static_nic(subnet="db"), network(WEB, APP))
    assert other.subnet == "web"


def test_static_keeps_the_same_ip_when_free() -> None:
    target = domain.failover_nic_target(static_nic(), network(APP), {"10.1.0.10"})
    assert target.connected and target.network_id == "net-b"
    assert target.ip_address == "10.1.0.11" and target.ip_mode is IpMode.STATIC


def test_static_takes_a_free_ip_when_taken_or_outside() -> None:
    taken = domain.failover_nic_target(static_nic(), network(APP), {"10.1.0.11", "10.1.0.10"})
    assert taken.ip_address == "10.1.0.12"
    outside = domain.failover_nic_target(static_nic("192.168.0.4"), network(APP))
    assert outside.ip_address == "10.1.0.10"


def test_static_pool_exhausted() -> None:
    used = {"10.1.0.10", "10.1.0.11", "10.1.0.12"}
    target = domain.failover_nic_target(static_nic(), network(APP), used)
    assert target.connected and target.ip_address is None and "no free address" in target.note


def test_static_without_pool() -> None:
    bare = Subnet(name="app", cidr="10.1.0.0/24")
    target = domain.failover_nic_target(static_nic(), network(bare))
    assert target.connected and target.ip_address is None and "no static IP pool" in target.note


def test_dhcp_not_managed() -> None:
    nic = Nic(nic_id="n0", network_id="net-a", subnet="app")
    target = domain.failover_nic_target(nic, network(APP))
    assert target.connected and target.ip_mode is IpMode.DHCP and target.ip_address is None
    assert "not managed" in target.note

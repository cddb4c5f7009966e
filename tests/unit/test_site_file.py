"""Site description parsing, object ids, and the inventory a site provider builds from it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.site_provider.domain import (
    FolderDisk,
    FolderVm,
    build_inventory,
    change_between,
    object_id,
    split_snapshot,
)
from services.site_provider.sitefile import (
    FolderVmMeta,
    SiteFileError,
    expand_name,
    parse_folder_meta,
    parse_site,
    read_site,
)
from shared.schemas.inventory import DiscoverySnapshot, IpMode

REPO = Path(__file__).resolve().parents[2]
ROOT = Path("/srv/hosts")

SMALL = """
clouds:
  - {name: Gold, host_groups: [HG]}
networks:
  - name: Corp
    subnets: [{name: corp, cidr: 10.0.0.0/24, static_pool: {start: 10.0.0.10, end: 10.0.0.12}}]
hosts:
  - {name: "hv{n}", count: 2, cloud: Gold, storage_dir: "{name}"}
vms:
  - {name: "web-{n:02}", count: 3, hosts: [hv1, hv2], nics: [{network: Corp, ip: static}]}
"""


def test_the_example_sites_parse_and_expand() -> None:
    primary = build_inventory("primary", read_site(REPO / "deploy/sites/primary.yaml"), ROOT, [])
    inv = primary.inventory
    assert [c.name for c in inv.clouds] == ["Gold-Primary", "Silver-Primary"]
    assert (len(inv.hosts), len(inv.vms), len(inv.networks)) == (3, 20, 1)
    recovery = build_inventory(
        "recovery", read_site(REPO / "deploy/sites/recovery.yaml"), ROOT, []
    ).inventory
    assert {n.name: n.isolated for n in recovery.networks} == {
        "Corp-Recovery": False,
        "Test-Recovery": True,
    }
    assert [c.name for c in recovery.clouds] == ["Gold-Recovery", "Silver-Recovery"]


def test_counted_vms_spread_round_robin_and_take_static_addresses() -> None:
    inv = build_inventory("primary", parse_site(SMALL), ROOT, []).inventory
    assert [v.name for v in inv.vms] == ["web-01", "web-02", "web-03"]
    hosts = {h.host_id: h.name for h in inv.hosts}
    assert [hosts[v.host_id] for v in inv.vms] == ["hv1", "hv2", "hv1"]
    assert [v.nics[0].ip_address for v in inv.vms] == ["10.0.0.10", "10.0.0.11", "10.0.0.12"]
    assert all(v.nics[0].ip_mode is IpMode.STATIC for v in inv.vms)
    assert inv.hosts[0].storage_dir == "/srv/hosts/hv1"
    assert inv.vms[0].disks[0].path == "/srv/hosts/hv1/web-01/os.vhdx"
    assert inv.vms[0].disks[0].size_bytes == 40 * 2**30  # the default OS disk


def test_static_addresses_stick_when_an_earlier_vm_goes() -> None:
    first = build_inventory("primary", parse_site(SMALL), ROOT, [])
    fewer = SMALL.replace('name: "web-{n:02}", count: 3', 'name: "web-{n:02}", count: 2, start: 2')
    second = build_inventory("primary", parse_site(fewer), ROOT, [], first.ip_allocations)
    assert [v.nics[0].ip_address for v in second.inventory.vms] == ["10.0.0.11", "10.0.0.12"]


def test_ids_are_stable_uuids_per_site_and_name() -> None:
    a = object_id("primary", "vm", "web-01")
    assert a == object_id("primary", "vm", "web-01")
    assert uuid.UUID(a).version == 5
    assert a != object_id("recovery", "vm", "web-01")
    assert a != object_id("primary", "vm", "web-02")
    assert a != object_id("primary", "host", "web-01")
    one = build_inventory("primary", parse_site(SMALL), ROOT, []).inventory
    two = build_inventory("primary", parse_site(SMALL), Path("/elsewhere"), []).inventory
    assert [v.vm_id for v in one.vms] == [v.vm_id for v in two.vms]
    assert one.vms[0].vm_id == a


def test_name_patterns() -> None:
    assert expand_name("web-{n:02}", 3) == "web-03"
    assert expand_name("web-{n}", 12) == "web-12"
    assert expand_name("hv-{n:3}", 7) == "hv-007"


def test_folder_vms_are_discovered_and_real_disks_replace_declared_ones() -> None:
    spec = parse_site(SMALL)
    folders = [
        FolderVm(
            "web-01", "hv1", None, (FolderDisk("os.vhdx", "/srv/hosts/hv1/web-01/os.vhdx", 123),)
        ),
        FolderVm(
            "restored",
            "hv2",
            FolderVmMeta(generation=1, cpu=4, nics=parse_folder_meta('{"nics": []}').nics),
            (FolderDisk("a.vhdx", "/x/a.vhdx", 10), FolderDisk("b.vhd", "/x/b.vhd", 20)),
        ),
    ]
    inv = build_inventory("primary", spec, ROOT, folders).inventory
    web = next(v for v in inv.vms if v.name == "web-01")
    assert [(d.name, d.size_bytes) for d in web.disks] == [("os.vhdx", 123)]
    # the same disk id as the declared "os" disk: materialising a disk doesn't change its id
    declared = build_inventory("primary", spec, ROOT, []).inventory.vms[0].disks[0]
    assert web.disks[0].disk_id == declared.disk_id
    restored = next(v for v in inv.vms if v.name == "restored")
    assert (restored.generation, restored.cpu_count) == (1, 4)
    assert [(d.name, d.type.value) for d in restored.disks] == [
        ("a.vhdx", "vhdx"),
        ("b.vhd", "vhd"),
    ]
    assert restored.host_id == object_id("primary", "host", "hv2")


def test_change_between_inventories() -> None:
    before = build_inventory("primary", parse_site(SMALL), ROOT, []).inventory
    edited = SMALL.replace("count: 3, hosts: [hv1, hv2]", "count: 2, hosts: [hv1, hv2], cpu: 4")
    after = build_inventory("primary", parse_site(edited), ROOT, []).inventory
    upserts, removals = change_between(before, after)
    assert [v.name for v in upserts.vms] == ["web-01", "web-02"]
    assert upserts.size() == 2
    assert removals.vms == [object_id("primary", "vm", "web-03")]
    nothing, none = change_between(after, after)
    assert nothing.size() == 0 and none.size() == 0


def test_a_large_snapshot_is_split_into_parts_under_the_budget() -> None:
    text = SMALL.replace("count: 3", "count: 200").replace("end: 10.0.0.12", "end: 10.0.0.250")
    inv = build_inventory("primary", parse_site(text), ROOT, []).inventory
    parts = split_snapshot("primary", 7, inv, max_bytes=20_000)
    assert len(parts) > 1
    assert {(p.sequence, p.parts) for p in parts} == {(7, len(parts))}
    assert [p.part for p in parts] == list(range(1, len(parts) + 1))
    assert sum(p.inventory.size() for p in parts) == inv.size()
    assert all(len(p.inventory.model_dump_json()) < 21_000 for p in parts)
    assert len(split_snapshot("primary", 7, inv, max_bytes=10**7)) == 1
    with pytest.raises(ValueError, match="part 3 > parts 2"):
        DiscoverySnapshot(site="s", sequence=1, inventory=inv, part=3, parts=2)


BAD = [
    ("clouds: [", "not valid YAML"),
    ("- a\n- b", "top level must be a mapping"),
    ("clouds: [{name: A, host_groups: [H]}]\nvlans: []", "vlans: unknown key"),
    ("hosts: [{name: h}]", "hosts.0.cloud: required key is missing"),
    ("clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: B}]", "unknown cloud 'B'"),
    ("clouds: [{name: A}]\nhosts: [{name: h, cloud: A}]", "cloud 'A' has no host_groups"),
    (
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A, host_group: X}]",
        "host_group 'X' is not one of",
    ),
    (
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A}]\n"
        "vms: [{name: v, host: nope}]",
        "unknown host 'nope'",
    ),
    (
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A}]\n"
        "vms: [{name: v, count: 2, host: h}]",
        "no {n} placeholder",
    ),
    (
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A}]\n"
        "vms: [{name: v, host: h, hosts: [h]}]",
        "exactly one of 'host' or 'hosts'",
    ),
    (
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A}]\n"
        "vms: [{name: v, host: h, disks: [{name: os, size: 40 parsecs}]}]",
        "'40 parsecs' is not a size",
    ),
    (
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A}]\n"
        "vms: [{name: v, host: h}, {name: v, host: h}]",
        "VM name 'v' is used twice",
    ),
    (
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A}]\n"
        "vms: [{name: v, host: h, generation: 3}]",
        "vms.0.generation",
    ),
    (
        "networks: [{name: N, subnets: [{name: s, cidr: 10.0.0.0/24}]}]\n"
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A}]\n"
        "vms: [{name: v, host: h, nics: [{network: N, ip: static}]}]",
        "subnet 's' has no static_pool",
    ),
    (
        "networks: [{name: N, subnets: [{name: s, cidr: 10.0.0.0/24}]}]\n"
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A}]\n"
        "vms: [{name: v, host: h, nics: [{network: N, ip: 10.9.9.9}]}]",
        "10.9.9.9 is not inside subnet 's'",
    ),
    (
        "clouds: [{name: A, host_groups: [H]}]\nhosts: [{name: h, cloud: A}]\n"
        "vms: [{name: v, host: h, nics: [{network: Nope}]}]",
        "unknown network 'Nope'",
    ),
    (
        "networks: [{name: N, subnets: [{name: s, cidr: 10.0.0.0/24,"
        " static_pool: {start: 10.0.0.9, end: 10.0.0.1}}]}]",
        "static pool start 10.0.0.9 is after its end",
    ),
    (
        "networks: [{name: N, subnets: [{name: s, cidr: 10.0.0.0/24,"
        " static_pool: {start: 10.0.1.1, end: 10.0.1.9}}]}]",
        "is not inside 10.0.0.0/24",
    ),
    ("networks: [{name: N, subnets: [{name: s, cidr: 10.0.0.0/33}]}]", "networks.0.subnets.0.cidr"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_site_files_say_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(SiteFileError) as err:
        parse_site(text, "site.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("site.yaml")


def test_problems_found_while_building_the_inventory() -> None:
    with pytest.raises(SiteFileError, match="serves site 'recovery'"):
        build_inventory("recovery", parse_site("site: primary"), ROOT, [])
    exhausted = SMALL.replace("count: 3", "count: 4")
    with pytest.raises(SiteFileError, match="is exhausted"):
        build_inventory("primary", parse_site(exhausted), ROOT, [])
    twice = SMALL + "  - {name: db, host: hv1, nics: [{network: Corp, ip: 10.0.0.11}]}\n"
    twice = twice.replace("ip: static", "ip: 10.0.0.10")  # web-01..03 get .10, .11, .12
    with pytest.raises(SiteFileError, match=r"IP 10\.0\.0\.11 on network 'Corp' is given to both"):
        build_inventory("primary", parse_site(twice), ROOT, [])


def test_missing_site_file_and_bad_vm_json() -> None:
    with pytest.raises(SiteFileError, match="can't read the site file"):
        read_site(Path("/nonexistent/site.yaml"))
    with pytest.raises(SiteFileError, match="not valid JSON"):
        parse_folder_meta("{")
    with pytest.raises(SiteFileError, match="generation"):
        parse_folder_meta('{"generation": 5}')
    assert parse_folder_meta('{"cpu": 8, "agent_notes": 1}').cpu == 8

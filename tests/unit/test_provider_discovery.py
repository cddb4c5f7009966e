"""The site provider's discovery state and storage scan (local files only, no network)."""

from __future__ import annotations

import time
from pathlib import Path

from services.site_provider.config import ProviderSettings
from services.site_provider.discovery import Discovery, DiscoveryState, save_state
from services.site_provider.domain import object_id

SITE = """
clouds: [{name: Gold, host_groups: [HG]}]
hosts: [{name: hv1, cloud: Gold, storage_dir: "{name}"}]
vms: [{name: declared, host: hv1, disks: [{name: os, size: 1GiB}]}]
"""


def settings(tmp_path: Path) -> ProviderSettings:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(SITE)
    return ProviderSettings(
        state_dir=tmp_path / "state", site_file=site_file, site="primary", name="vmm"
    )


def test_sequences_grow_across_restarts_and_never_fall_below_the_clock(tmp_path: Path) -> None:
    s = settings(tmp_path)
    first = Discovery(s).next_sequence()
    assert first >= time.time_ns() // 1_000_000 - 1000
    restarted = Discovery(s)  # a new process reads the persisted state
    assert restarted.next_sequence() > first
    ahead = first + 10**9  # e.g. the clock went back: the persisted value still wins
    save_state(s.state_dir, DiscoveryState(sequence=ahead))
    assert Discovery(s).next_sequence() == ahead + 1


def test_vm_folders_on_host_storage_are_discovered(tmp_path: Path) -> None:
    s = settings(tmp_path)
    storage = s.storage_base / "hv1"
    (storage / "declared").mkdir(parents=True)
    (storage / "declared" / "os.vhdx").write_bytes(b"x" * 4096)
    (storage / "found").mkdir()
    (storage / "found" / "data.VHD").write_bytes(b"y" * 100)
    (storage / "found" / "vm.json").write_text('{"memory_mb": 2048}')
    (storage / "broken").mkdir()
    (storage / "broken" / "vm.json").write_text("{oops")  # defaults, with a warning
    (storage / "empty").mkdir()  # neither disks nor vm.json: not a VM
    (storage / "notes.txt").write_text("not a folder")
    vms = {vm.name: vm for vm in Discovery(s).discover().inventory.vms}
    assert sorted(vms) == ["broken", "declared", "found"]
    declared = vms["declared"].disks[0]
    assert (declared.size_bytes, declared.disk_id) == (
        4096,
        object_id("primary", "disk", "declared", "os"),
    )
    assert declared.path == str((storage / "declared" / "os.vhdx").resolve())
    assert vms["found"].memory_mb == 2048
    assert [(d.name, d.size_bytes, d.type) for d in vms["found"].disks] == [
        ("data.VHD", 100, "vhd")
    ]
    assert vms["broken"].disks == []


NETWORKED_SITE = """
clouds: [{name: Gold, host_groups: [HG]}]
networks:
  - name: Corp
    subnets:
      - {name: corp, cidr: 10.20.0.0/24, static_pool: {start: 10.20.0.100, end: 10.20.0.199}}
hosts: [{name: hv1, cloud: Gold, storage_dir: "{name}"}]
"""


def test_nics_a_host_agent_recorded_in_vm_json_are_discovered(tmp_path: Path) -> None:
    s = settings(tmp_path)
    s.site_file.write_text(NETWORKED_SITE)  # type: ignore[union-attr]
    corp = object_id("primary", "network", "Corp")
    folder = s.storage_base / "hv1" / "web01"
    folder.mkdir(parents=True)
    (folder / "disk.vhdx").write_bytes(b"x" * 4096)
    (folder / "vm.json").write_text(
        '{"id": "vm-1", "nics": ['
        f'{{"nic_id": "a", "network_id": "{corp}", "subnet": "corp", "ip_mode": "static",'
        ' "ip_address": "10.20.0.150"},'
        f'{{"nic_id": "b", "network_id": "{corp}", "subnet": "nope", "ip_mode": "static",'
        ' "ip_address": "10.99.0.5"},'
        f'{{"nic_id": "c", "network_id": "{corp}", "ip_mode": "dhcp"}},'
        '{"nic_id": "d", "network_id": "some-other-site-network"},'
        '{"nic_id": "e", "network_id": null}]}'
    )
    vm = Discovery(s).discover().inventory.vms[0]
    got = [(n.network_id, n.subnet, n.ip_mode.value, n.ip_address) for n in vm.nics]
    assert got == [
        (corp, "corp", "static", "10.20.0.150"),
        (corp, "corp", "static", "10.20.0.100"),  # not in the subnet: any free pool address
        (corp, "corp", "dhcp", None),
        (None, None, "dhcp", None),  # not a network of this site: not connected
        (None, None, "dhcp", None),
    ]


def test_object_ids_are_scoped_by_vault() -> None:
    from services.site_provider.domain import build_inventory
    from services.site_provider.sitefile import parse_site

    spec = parse_site(
        "site: primary\nclouds: [{name: Gold, host_groups: [HG]}]\n"
        "hosts: [{name: hv1, cloud: Gold}]\nvms: [{name: web, host: hv1}]\n"
    )
    one = build_inventory("primary", spec, Path("/nonexistent"), [], id_scope="vault-a")
    two = build_inventory("primary", spec, Path("/nonexistent"), [], id_scope="vault-b")
    again = build_inventory("primary", spec, Path("/nonexistent"), [], id_scope="vault-a")
    assert one.inventory.vms[0].vm_id != two.inventory.vms[0].vm_id
    assert one.inventory.clouds[0].cloud_id != two.inventory.clouds[0].cloud_id
    assert one.inventory.vms[0].vm_id == again.inventory.vms[0].vm_id

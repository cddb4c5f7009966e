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

"""Discovery loop of the site provider: every interval it reads the site file and scans its
hosts' storage folders, and publishes (signed, keyed by provider id on `inventory.discovery.v1`)
a full `DiscoverySnapshot` at start and every `full_snapshot_minutes`, and in between a
`DiscoveryChange` with only the differences.

Sequence numbers are persisted in the state folder (`discovery.json`) before a record is sent,
and never fall below the wall clock in milliseconds, so they keep growing across restarts even
if the state folder is lost. A snapshot over `max_part_bytes` of objects is split into parts
(Kafka refuses records over 1 MiB, and aiokafka checks the size before compression, so
compression alone can't make a 2,000-VM snapshot fit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field

from services.site_provider.config import ProviderSettings
from services.site_provider.domain import (
    DISK_SUFFIXES,
    Discovered,
    FolderDisk,
    FolderVm,
    HostPlan,
    build_inventory,
    change_between,
    counts,
    host_plans,
    split_snapshot,
)
from services.site_provider.sitefile import SiteFileError, SiteSpec, parse_folder_meta, read_site
from shared.edge import SignedPublisher
from shared.files import write_atomic
from shared.schemas.inventory import DiscoveryChange, Inventory

log = logging.getLogger(__name__)

PUBLISHED = Counter(
    "dr_provider_discovery_published_total", "Discovery records published", ["type"]
)
SEQUENCE = Gauge("dr_provider_discovery_sequence", "Sequence of the last discovery published")
SITE_FILE_ERRORS = Counter(
    "dr_provider_site_file_errors_total", "Polls where the site description was unusable"
)


class DiscoveryState(BaseModel):
    """What survives a restart (`<state_dir>/discovery.json`)."""

    sequence: int = Field(default=0, ge=0)
    ip_allocations: dict[str, str] = Field(default_factory=dict)


def load_state(state_dir: Path) -> DiscoveryState:
    path = state_dir / "discovery.json"
    if not path.exists():
        return DiscoveryState()
    return DiscoveryState.model_validate_json(path.read_text())


def save_state(state_dir: Path, state: DiscoveryState) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(state_dir / "discovery.json", state.model_dump_json().encode())


def scan_storage(plans: list[HostPlan]) -> list[FolderVm]:
    """VM folders on the hosts' storage: `<storage_dir>/<vm>/` holding `*.vhdx`/`*.vhd` images
    or `*.avhdx` differencing disks (size = file size) and/or a `vm.json`."""
    found: dict[str, FolderVm] = {}
    for plan in plans:
        if plan.storage_dir is None or not plan.storage_dir.is_dir():
            continue
        for folder in sorted(plan.storage_dir.iterdir()):
            try:
                vm = _folder_vm(plan.name, folder)
            except OSError as exc:  # removed while we looked: next poll sees the new state
                log.warning("VM folder unreadable", extra={"path": str(folder), "error": str(exc)})
                continue
            if vm is None:
                continue
            if vm.name in found:
                log.warning(
                    "VM folder on two hosts; keeping the first",
                    extra={"vm": vm.name, "hosts": [found[vm.name].host, plan.name]},
                )
                continue
            found[vm.name] = vm
    return list(found.values())


def _folder_vm(host: str, folder: Path) -> FolderVm | None:
    if not folder.is_dir():
        return None
    disks = []
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in DISK_SUFFIXES and f.is_file():
            size = f.stat().st_size
            if size > 0:
                disks.append(FolderDisk(f.name, str(f.resolve()), size))
    meta_path = folder / "vm.json"
    if not disks and not meta_path.is_file():
        return None
    meta = None
    if meta_path.is_file():
        try:
            meta = parse_folder_meta(meta_path.read_text())
        except SiteFileError as exc:
            log.warning(
                "vm.json unusable; using defaults",
                extra={"path": str(meta_path), "error": str(exc)},
            )
    return FolderVm(folder.name, host, meta, tuple(disks))


class Discovery:
    """Polls the site and publishes what changed; `status()` goes into heartbeats and health."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.state = load_state(settings.state_dir)
        self.last: Inventory | None = None
        self.last_full = float("-inf")
        self.last_error: str | None = None
        self.published_at: float | None = None
        self.id_scope: str | None = None  # the vault, once registered

    def discover(self) -> Discovered:
        s = self.settings
        spec = read_site(s.site_file) if s.site_file is not None else SiteSpec()
        plans = host_plans(spec, s.storage_base)
        return build_inventory(
            s.site,
            spec,
            s.storage_base,
            scan_storage(plans),
            self.state.ip_allocations,
            id_scope=self.id_scope,
        )

    def next_sequence(self) -> int:
        """Reserve the next sequence (persisted before anything is sent with it)."""
        sequence = max(self.state.sequence + 1, time.time_ns() // 1_000_000)
        self.state = self.state.model_copy(update={"sequence": sequence})
        save_state(self.settings.state_dir, self.state)
        SEQUENCE.set(sequence)
        return sequence

    async def run(self, publisher: SignedPublisher) -> None:
        interval = self.settings.discovery_interval_seconds
        self.id_scope = str(publisher.identity.vault_id)
        while True:
            await self.poll(publisher)
            await asyncio.sleep(interval)

    async def poll(self, publisher: SignedPublisher) -> None:
        try:
            found = await asyncio.to_thread(self.discover)
        except SiteFileError as exc:
            SITE_FILE_ERRORS.inc()
            self.last_error = str(exc)
            log.error(
                "site description unusable; keeping the last inventory", extra={"error": str(exc)}
            )
            return
        self.state = self.state.model_copy(update={"ip_allocations": found.ip_allocations})
        self.last_error = None
        full_due = time.monotonic() - self.last_full >= self.settings.full_snapshot_minutes * 60
        try:
            if self.last is None or full_due:
                await self.publish_snapshot(publisher, found.inventory)
            else:
                await self.publish_change(publisher, self.last, found.inventory)
        except Exception as exc:
            self.last_error = f"publish failed: {exc!r}"
            log.warning("discovery publish failed; retrying next poll", extra={"error": repr(exc)})
            return
        self.last = found.inventory

    async def publish_snapshot(self, publisher: SignedPublisher, inventory: Inventory) -> None:
        sequence = self.next_sequence()
        key = str(publisher.identity.producer_id)
        parts = split_snapshot(
            self.settings.site, sequence, inventory, self.settings.max_part_bytes
        )
        for part in parts:
            await publisher.publish(part, key=key)
        PUBLISHED.labels("DiscoverySnapshot").inc(len(parts))
        self.last_full = time.monotonic()
        self.published_at = time.time()
        log.info(
            "discovery snapshot published",
            extra={"sequence": sequence, "parts": len(parts), **counts(inventory)},
        )

    async def publish_change(
        self, publisher: SignedPublisher, old: Inventory, new: Inventory
    ) -> None:
        upserts, removals = change_between(old, new)
        if not upserts.size() and not removals.size():
            return
        change = DiscoveryChange(
            site=self.settings.site, sequence=0, upserts=upserts, removals=removals
        )
        if len(change.model_dump_json()) > self.settings.max_part_bytes:
            await self.publish_snapshot(publisher, new)  # too big for one record
            return
        change = change.model_copy(update={"sequence": self.next_sequence()})
        await publisher.publish(change, key=str(publisher.identity.producer_id))
        PUBLISHED.labels("DiscoveryChange").inc()
        self.published_at = time.time()
        log.info(
            "discovery change published",
            extra={
                "sequence": change.sequence,
                "upserts": counts(upserts),
                "removals": removals.size(),
            },
        )

    def status(self) -> dict[str, Any]:
        return {
            "discovery": {
                "sequence": self.state.sequence,
                "objects": counts(self.last) if self.last is not None else None,
                "published_at": self.published_at,
                "error": self.last_error,
            }
        }

"""Inventory rules, pure: which discovery records are stale, what a snapshot or change does to
the stored objects (compared by content hash, so only differences are written), the checks a
snapshot must pass, and the events that announce each difference."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shared.schemas.envelope import EventPayload
from shared.schemas.inventory import (
    Change,
    Cloud,
    CloudChanged,
    Host,
    HostChanged,
    Inventory,
    InventoryObject,
    Kind,
    NetworkChanged,
    Removals,
    Vm,
    VmChanged,
    VmNetwork,
    content_hash,
    object_id_of,
)

Key = tuple[Kind, str]
KIND_ORDER = {kind: i for i, kind in enumerate(Kind)}


@dataclass(frozen=True)
class Upsert:
    kind: Kind
    obj: InventoryObject
    content_hash: str
    change: Change  # ADDED or CHANGED

    @property
    def object_id(self) -> str:
        return object_id_of(self.obj)


@dataclass(frozen=True)
class Plan:
    """What applying a record changes: objects to write, and keys to delete."""

    upserts: list[Upsert]
    removals: list[Key]

    @property
    def empty(self) -> bool:
        return not self.upserts and not self.removals

    def tally(self) -> Counter[tuple[Kind, Change]]:
        counts: Counter[tuple[Kind, Change]] = Counter((u.kind, u.change) for u in self.upserts)
        counts.update((kind, Change.REMOVED) for kind, _ in self.removals)
        return counts


def is_stale(last_applied: int | None, sequence: int) -> bool:
    """A record no newer than the last applied one of its provider is stale: ignored."""
    return last_applied is not None and sequence <= last_applied


def _upserts(
    existing: Mapping[Key, str], objects: Iterable[tuple[Kind, InventoryObject]]
) -> list[Upsert]:
    out = []
    for kind, obj in objects:
        digest = content_hash(obj)
        before = existing.get((kind, object_id_of(obj)))
        if before != digest:
            out.append(
                Upsert(kind, obj, digest, Change.ADDED if before is None else Change.CHANGED)
            )
    return out


def _removal_order(keys: Iterable[Key]) -> list[Key]:
    """VMs first, networks last: nothing is removed while something still refers to it."""
    return sorted(keys, key=lambda k: (-KIND_ORDER[k[0]], k[1]))


def plan_snapshot(existing: Mapping[Key, str], inventory: Inventory) -> Plan:
    """A full snapshot: add or change what differs, remove what the snapshot doesn't have."""
    present = {(kind, object_id_of(obj)) for kind, obj in inventory.objects()}
    return Plan(
        upserts=_upserts(existing, inventory.objects()),
        removals=_removal_order(k for k in existing if k not in present),
    )


def plan_change(existing: Mapping[Key, str], upserts: Inventory, removals: Removals) -> Plan:
    """An incremental change: add or change what differs; remove only listed, known objects."""
    upserted = {(kind, object_id_of(obj)) for kind, obj in upserts.objects()}
    return Plan(
        upserts=_upserts(existing, upserts.objects()),
        removals=_removal_order(
            k for k in set(removals.keys()) if k in existing and k not in upserted
        ),
    )


def duplicate_problems(inventory: Inventory) -> list[str]:
    seen = Counter((kind, object_id_of(obj)) for kind, obj in inventory.objects())
    return [f"{kind.value} id {oid} appears {n} times" for (kind, oid), n in seen.items() if n > 1]


def snapshot_problems(inventory: Inventory, limit: int = 10) -> list[str]:
    """Why a full snapshot can't be applied as is (empty: it can): ids must be unique, and
    hosts, VMs and NICs must refer to clouds, hosts and networks of the same snapshot."""
    problems = duplicate_problems(inventory)
    clouds = {c.cloud_id for c in inventory.clouds}
    hosts = {h.host_id: h for h in inventory.hosts}
    networks = {n.network_id for n in inventory.networks}
    for h in inventory.hosts:
        if h.cloud_id not in clouds:
            problems.append(f"host {h.name}: cloud {h.cloud_id} is not in the snapshot")
    for vm in inventory.vms:
        host = hosts.get(vm.host_id)
        if host is None:
            problems.append(f"VM {vm.name}: host {vm.host_id} is not in the snapshot")
        elif host.cloud_id != vm.cloud_id:
            problems.append(f"VM {vm.name}: cloud {vm.cloud_id} is not its host's cloud")
        for nic in vm.nics:
            if nic.network_id is not None and nic.network_id not in networks:
                problems.append(f"VM {vm.name}: network {nic.network_id} is not in the snapshot")
    return problems[:limit]


def merge_parts(parts: Iterable[Inventory]) -> Inventory:
    """The whole inventory of a snapshot that came in parts."""
    objects: list[InventoryObject] = [obj for part in parts for _, obj in part.objects()]
    return Inventory.of(objects)


def columns_of(obj: InventoryObject) -> tuple[str, str | None, str | None]:
    """(name, cloud id, host id): the columns the API filters on."""
    if isinstance(obj, Vm):
        return obj.name, obj.cloud_id, obj.host_id
    if isinstance(obj, Host):
        return obj.name, obj.cloud_id, None
    if isinstance(obj, Cloud):
        return obj.name, obj.cloud_id, None
    return obj.name, None, None


def event_for(
    kind: Kind,
    object_id: str,
    obj: InventoryObject | None,
    change: Change,
    provider_id: uuid.UUID,
    site: str,
) -> EventPayload:
    """The event announcing one difference (`obj` is None when removed)."""
    common = {"provider_id": provider_id, "site": site, "change": change}
    if kind is Kind.CLOUD:
        assert obj is None or isinstance(obj, Cloud)
        return CloudChanged(**common, cloud_id=object_id, cloud=obj)
    if kind is Kind.HOST:
        assert obj is None or isinstance(obj, Host)
        return HostChanged(**common, host_id=object_id, host=obj)
    if kind is Kind.VM:
        assert obj is None or isinstance(obj, Vm)
        return VmChanged(**common, vm_id=object_id, vm=obj)
    assert obj is None or isinstance(obj, VmNetwork)
    return NetworkChanged(**common, network_id=object_id, network=obj)


def events_of(plan: Plan, provider_id: uuid.UUID, site: str) -> list[EventPayload]:
    """Adds and changes in dependency order (networks, clouds, hosts, VMs), then removals."""
    events = [
        event_for(u.kind, u.object_id, u.obj, u.change, provider_id, site) for u in plan.upserts
    ]
    events += [
        event_for(kind, oid, None, Change.REMOVED, provider_id, site) for kind, oid in plan.removals
    ]
    return events

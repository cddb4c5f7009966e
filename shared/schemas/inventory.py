"""Inventory contract: what site providers discover (`inventory.discovery.v1`, signed, keyed by
provider id) and what the inventory service emits about it (`inventory.events.v1`, keyed by
provider id so one site's changes stay ordered).

Object ids are unique within a vault (VMM GUIDs; the simulated provider derives stable UUIDs
from the site and object names). Sizes are bytes, memory MiB.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from shared import topics
from shared.schemas.envelope import EventPayload
from shared.schemas.registry import event_type

ObjectId = str
# Namespace of the ids a site provider derives: uuid5 of "<vault>/<site>/<kind>/<name>[/...]".
ID_NAMESPACE = uuid.UUID("5d0c8f3e-2b7a-4c61-9e3d-0a4f6b1c7e29")
ID_FIELD = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
NAME_FIELD = Field(min_length=1, max_length=200)


class IpMode(StrEnum):
    STATIC = "static"
    DHCP = "dhcp"


class StaticPool(EventPayload):
    start: str
    end: str


class Subnet(EventPayload):
    name: str = NAME_FIELD
    cidr: str = Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")
    static_pool: StaticPool | None = None


class VmNetwork(EventPayload):
    network_id: ObjectId = ID_FIELD
    name: str = NAME_FIELD
    logical_network: str = ""
    subnets: list[Subnet] = Field(default_factory=list, max_length=256)
    isolated: bool = Field(default=False, description="Usable as a test-failover network.")


class Cloud(EventPayload):
    cloud_id: ObjectId = ID_FIELD
    name: str = NAME_FIELD
    host_groups: list[str] = Field(default_factory=list, max_length=100)
    capability_profiles: list[str] = Field(default_factory=lambda: ["Hyper-V"], max_length=20)
    capacity_vms: int = Field(default=1000, ge=0, description="VMs the cloud can still host.")


class Host(EventPayload):
    host_id: ObjectId = ID_FIELD
    name: str = NAME_FIELD
    cloud_id: ObjectId = ID_FIELD
    host_group: str = NAME_FIELD
    os_version: str = Field(min_length=1, max_length=100)
    cpu_count: int = Field(default=16, ge=1)
    memory_mb: int = Field(default=131072, ge=1)
    storage_dir: str = ""


class DiskType(StrEnum):
    VHDX = "vhdx"
    VHD = "vhd"


class Disk(EventPayload):
    disk_id: ObjectId = ID_FIELD
    name: str = NAME_FIELD
    size_bytes: int = Field(gt=0, le=64 * 2**40)
    type: DiskType = DiskType.VHDX
    path: str = ""
    shared: bool = False
    encrypted: bool = False


class Nic(EventPayload):
    nic_id: ObjectId = ID_FIELD
    network_id: ObjectId | None = Field(default=None, description="VM network; None: unconnected")
    subnet: str | None = None
    ip_mode: IpMode = IpMode.DHCP
    ip_address: str | None = None

    @model_validator(mode="after")
    def _static_needs_ip(self) -> Nic:
        if self.ip_mode is IpMode.STATIC and not self.ip_address:
            raise ValueError("a static NIC needs ip_address")
        return self


class VmState(StrEnum):
    RUNNING = "Running"
    OFF = "Off"


class Vm(EventPayload):
    vm_id: ObjectId = ID_FIELD
    name: str = NAME_FIELD
    cloud_id: ObjectId = ID_FIELD
    host_id: ObjectId = ID_FIELD
    generation: Literal[1, 2] = 2
    cpu_count: int = Field(default=2, ge=1, le=240)
    memory_mb: int = Field(default=4096, ge=32)
    state: VmState = VmState.RUNNING
    disks: list[Disk] = Field(default_factory=list, max_length=256)
    nics: list[Nic] = Field(default_factory=list, max_length=64)


class Kind(StrEnum):
    """Kinds of inventory objects; also the order in which adds and changes apply (removals
    apply in reverse), so a VM never refers to a host or network not yet known."""

    NETWORK = "network"
    CLOUD = "cloud"
    HOST = "host"
    VM = "vm"


InventoryObject = VmNetwork | Cloud | Host | Vm


def object_id_of(obj: InventoryObject) -> ObjectId:
    if isinstance(obj, VmNetwork):
        return obj.network_id
    if isinstance(obj, Cloud):
        return obj.cloud_id
    if isinstance(obj, Host):
        return obj.host_id
    return obj.vm_id


def content_hash(obj: InventoryObject) -> str:
    """SHA-256 of the object's JSON: equal hashes mean nothing changed."""
    return hashlib.sha256(obj.model_dump_json().encode()).hexdigest()


class Inventory(EventPayload):
    """A site's whole inventory (the body of a full snapshot)."""

    clouds: list[Cloud] = Field(default_factory=list, max_length=1000)
    hosts: list[Host] = Field(default_factory=list, max_length=10_000)
    vms: list[Vm] = Field(default_factory=list, max_length=100_000)
    networks: list[VmNetwork] = Field(default_factory=list, max_length=10_000)

    def objects(self) -> Iterator[tuple[Kind, InventoryObject]]:
        """Every object with its kind, in `Kind` order."""
        yield from ((Kind.NETWORK, o) for o in self.networks)
        yield from ((Kind.CLOUD, o) for o in self.clouds)
        yield from ((Kind.HOST, o) for o in self.hosts)
        yield from ((Kind.VM, o) for o in self.vms)

    def size(self) -> int:
        return len(self.networks) + len(self.clouds) + len(self.hosts) + len(self.vms)

    @classmethod
    def of(cls, objects: list[InventoryObject]) -> Inventory:
        return cls(
            networks=[o for o in objects if isinstance(o, VmNetwork)],
            clouds=[o for o in objects if isinstance(o, Cloud)],
            hosts=[o for o in objects if isinstance(o, Host)],
            vms=[o for o in objects if isinstance(o, Vm)],
        )


class Removals(EventPayload):
    clouds: list[ObjectId] = Field(default_factory=list)
    hosts: list[ObjectId] = Field(default_factory=list)
    vms: list[ObjectId] = Field(default_factory=list)
    networks: list[ObjectId] = Field(default_factory=list)

    def keys(self) -> list[tuple[Kind, ObjectId]]:
        return [
            *((Kind.NETWORK, i) for i in self.networks),
            *((Kind.CLOUD, i) for i in self.clouds),
            *((Kind.HOST, i) for i in self.hosts),
            *((Kind.VM, i) for i in self.vms),
        ]

    def size(self) -> int:
        return len(self.networks) + len(self.clouds) + len(self.hosts) + len(self.vms)


@event_type("DiscoverySnapshot", topic=topics.INVENTORY_DISCOVERY, signed=True)
class DiscoverySnapshot(EventPayload):
    """A provider's full inventory of its site. `sequence` grows with every snapshot or change
    the provider publishes; one older than the last applied is ignored (stale).

    A snapshot too large for one Kafka record (1 MiB) is split into `parts` records with the same
    `sequence`, each carrying a share of the objects (`part` 1..`parts`); the inventory applies
    it once it holds every part. Objects absent from the whole snapshot are removed."""

    site: str = NAME_FIELD
    sequence: int = Field(ge=0)
    inventory: Inventory
    part: int = Field(default=1, ge=1, le=1000)
    parts: int = Field(default=1, ge=1, le=1000)

    @model_validator(mode="after")
    def _part_in_range(self) -> DiscoverySnapshot:
        if self.part > self.parts:
            raise ValueError(f"part {self.part} > parts {self.parts}")
        return self


@event_type("DiscoveryChange", topic=topics.INVENTORY_DISCOVERY, signed=True)
class DiscoveryChange(EventPayload):
    """Incremental change: objects added or changed (`upserts`) and removed (`removals`)."""

    site: str = NAME_FIELD
    sequence: int = Field(ge=0)
    upserts: Inventory = Field(default_factory=Inventory)
    removals: Removals = Field(default_factory=Removals)


class Change(StrEnum):
    ADDED = "added"
    CHANGED = "changed"
    REMOVED = "removed"


class _InventoryEvent(EventPayload):
    provider_id: uuid.UUID
    site: str
    change: Change


@event_type("CloudChanged", topic=topics.INVENTORY_EVENTS)
class CloudChanged(_InventoryEvent):
    """A cloud was added, changed or removed (`cloud` is None when removed)."""

    cloud_id: ObjectId
    cloud: Cloud | None


@event_type("HostChanged", topic=topics.INVENTORY_EVENTS)
class HostChanged(_InventoryEvent):
    """A host was added, changed or removed (`host` is None when removed)."""

    host_id: ObjectId
    host: Host | None


@event_type("VmChanged", topic=topics.INVENTORY_EVENTS)
class VmChanged(_InventoryEvent):
    """A VM was added, changed or removed (`vm` is None when removed)."""

    vm_id: ObjectId
    vm: Vm | None


@event_type("NetworkChanged", topic=topics.INVENTORY_EVENTS)
class NetworkChanged(_InventoryEvent):
    """A VM network was added, changed or removed (`network` is None when removed)."""

    network_id: ObjectId
    network: VmNetwork | None


def object_id(site: str, kind: str, *names: str) -> str:
    """Stable id of a site's object: the same (vault-scoped) site and names always give the
    same UUID. `site` is "<vault>/<site>" for every provider that has registered."""
    return str(uuid.uuid5(ID_NAMESPACE, "/".join((site, kind, *names))))


def foreign_ids(inventory: Inventory, vault_id: uuid.UUID, site: str, limit: int = 10) -> list[str]:
    """The objects of `inventory` whose ids are not the ones the provider's own vault and site
    derive from their names: a provider may describe only its own site's objects."""
    scope = f"{vault_id}/{site}"
    found = []
    for kind, oid, names in (
        *(("cloud", c.cloud_id, (c.name,)) for c in inventory.clouds),
        *(("host", h.host_id, (h.name,)) for h in inventory.hosts),
        *(("network", n.network_id, (n.name,)) for n in inventory.networks),
        *(("vm", v.vm_id, (v.name,)) for v in inventory.vms),
        *(
            ("disk", d.disk_id, (v.name, d.name.rsplit(".", 1)[0] if "." in d.name else d.name))
            for v in inventory.vms
            for d in v.disks
        ),
    ):
        if oid != object_id(scope, kind, *names):
            found.append(f"{kind} {names[-1]!r}: id {oid} is not this provider's site's id")
            if len(found) >= limit:
                break
    return found

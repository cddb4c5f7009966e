"""What the simulated VMM server knows, as pure functions: stable object ids, the site's
inventory built from its description and from the VM folders found on its hosts' storage,
the change between two inventories, and a snapshot split to fit Kafka's record limit."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from services.site_provider.sitefile import (
    DiskSpec,
    FolderNic,
    FolderVmMeta,
    HostSpec,
    NetworkSpec,
    NicSpec,
    SiteFileError,
    SiteSpec,
    SubnetSpec,
    nic_problems,
)
from shared.schemas.inventory import (
    Cloud,
    DiscoverySnapshot,
    Disk,
    DiskType,
    Host,
    Inventory,
    InventoryObject,
    IpMode,
    Kind,
    Nic,
    Removals,
    StaticPool,
    Subnet,
    Vm,
    VmNetwork,
    VmState,
    content_hash,
    object_id,
    object_id_of,
)

DISK_SUFFIXES = {
    ".vhdx": DiskType.VHDX,
    ".vhd": DiskType.VHD,
    ".avhdx": DiskType.VHDX,  # a differencing disk (a test failover's VM): its size is the disk's
}


@dataclass(frozen=True)
class FolderDisk:
    name: str  # file name, e.g. "os.vhdx"
    path: str
    size_bytes: int


@dataclass(frozen=True)
class FolderVm:
    """A VM found on a host's storage: `<storage_dir>/<name>/` with disk images, `vm.json`."""

    name: str
    host: str
    meta: FolderVmMeta | None
    disks: tuple[FolderDisk, ...]


@dataclass(frozen=True)
class HostPlan:
    name: str
    spec: HostSpec
    storage_dir: Path | None


@dataclass(frozen=True)
class Discovered:
    inventory: Inventory
    ip_allocations: dict[str, str] = field(default_factory=dict)  # static NIC id -> address


def host_plans(spec: SiteSpec, storage_root: Path) -> list[HostPlan]:
    plans = []
    for host in spec.hosts:
        for name in host.names():
            folder = None
            if host.storage_dir is not None:
                folder = storage_root / host.storage_dir.replace("{name}", name)
            plans.append(HostPlan(name, host, folder))
    return plans


class IpAllocator:
    """Static addresses: explicit ones reserved first, then the pools hand out free addresses.
    `sticky` (NIC id -> address, from the last run) keeps a NIC's address while it is free."""

    def __init__(self, sticky: dict[str, str]) -> None:
        self.sticky = sticky
        self.sticky_ips = {ipaddress.IPv4Address(ip) for ip in sticky.values()}
        self.taken: dict[tuple[str, ipaddress.IPv4Address], str] = {}
        self.cursor: dict[tuple[str, str], ipaddress.IPv4Address] = {}
        self.allocated: dict[str, str] = {}

    def reserve(self, net: str, ip: ipaddress.IPv4Address, owner: str) -> None:
        holder = self.taken.get((net, ip))
        if holder is not None and holder != owner:
            raise SiteFileError(f"IP {ip} on network '{net}' is given to both {holder} and {owner}")
        self.taken[(net, ip)] = owner

    def allocate(self, net: str, subnet: SubnetSpec, nic_id: str, owner: str) -> str:
        pool = subnet.static_pool
        assert pool is not None  # checked when the site file was parsed
        previous = self.sticky.get(nic_id)
        if previous is not None:
            ip = ipaddress.IPv4Address(previous)
            if pool.start <= ip <= pool.end and (net, ip) not in self.taken:
                return self._take(net, ip, nic_id, owner)
        # Addresses other NICs held last time stay theirs; the cursor only moves forward.
        ip = self.cursor.get((net, subnet.name), pool.start)
        while ip <= pool.end:
            if (net, ip) not in self.taken and ip not in self.sticky_ips:
                self.cursor[(net, subnet.name)] = ip + 1
                return self._take(net, ip, nic_id, owner)
            ip += 1
        raise SiteFileError(
            f"static pool {pool.start}-{pool.end} of '{net}/{subnet.name}' is exhausted ({owner})"
        )

    def _take(self, net: str, ip: ipaddress.IPv4Address, nic_id: str, owner: str) -> str:
        self.taken[(net, ip)] = owner
        self.allocated[nic_id] = str(ip)
        return str(ip)


@dataclass(frozen=True)
class _VmDraft:
    name: str
    host: HostPlan
    generation: Literal[1, 2]
    cpu: int
    memory_mb: int
    state: VmState
    disks: tuple[Disk, ...]
    nics: tuple[tuple[NicSpec, ipaddress.IPv4Address | None], ...]  # spec, explicit address


def build_inventory(
    site: str,
    spec: SiteSpec,
    storage_root: Path,
    folders: list[FolderVm],
    sticky_ips: dict[str, str] | None = None,
    id_scope: str | None = None,
) -> Discovered:
    """The site's inventory: the description, plus VMs found in the hosts' storage folders.

    A folder whose name is a described VM gives that VM its real disks (the description keeps
    the rest); any other folder is a VM of its own, described by its optional `vm.json`.
    Object ids derive from `id_scope` (the provider's vault) + site + names, so two vaults with
    sites of the same names never share an id.
    """
    if spec.site is not None and spec.site != site:
        raise SiteFileError(
            f"the site file describes site '{spec.site}' but this provider serves site '{site}'"
        )
    site = f"{id_scope}/{site}" if id_scope else site  # from here on: only for object ids
    clouds = {
        c.name: Cloud(
            cloud_id=object_id(site, "cloud", c.name),
            name=c.name,
            host_groups=c.host_groups,
            capability_profiles=c.capability_profiles,
            capacity_vms=c.capacity_vms,
        )
        for c in spec.clouds
    }
    networks = {n.name: n for n in spec.networks}
    plans = {p.name: p for p in host_plans(spec, storage_root)}
    hosts = [_host(site, plan, clouds) for plan in plans.values()]
    by_folder = {f.name: f for f in folders}

    drafts: list[_VmDraft] = []
    for vm_spec in spec.vms:
        placement = vm_spec.placement()
        for i, name in enumerate(vm_spec.names()):
            plan = plans[placement[i % len(placement)]]
            found = by_folder.pop(name, None)
            disks = (
                _folder_disks(site, name, found)
                if found is not None and found.disks
                else _declared_disks(site, name, plan, vm_spec.disks)
            )
            nics = tuple((nic, _nth_address(nic, i)) for nic in vm_spec.nics)
            drafts.append(
                _VmDraft(
                    name, plan, vm_spec.generation, vm_spec.cpu, vm_spec.memory_mb,
                    vm_spec.state, disks, nics,
                )
            )  # fmt: skip
    for found in sorted(by_folder.values(), key=lambda f: (f.host, f.name)):
        meta = found.meta or FolderVmMeta()
        drafts.append(
            _VmDraft(
                found.name, plans[found.host], meta.generation, meta.cpu, meta.memory_mb,
                meta.state, _folder_disks(site, found.name, found),
                tuple(
                    (spec, _nth_address(spec, 0))
                    for spec in (_folder_nic(site, nic, networks) for nic in meta.nics)
                ),
            )
        )  # fmt: skip

    ips = IpAllocator(sticky_ips or {})
    for draft in drafts:
        for nic, address in draft.nics:
            if address is not None and nic.network is not None:
                ips.reserve(nic.network, address, f"VM '{draft.name}'")
    vms = [_vm(site, d, clouds, networks, ips) for d in drafts]
    inventory = Inventory(
        networks=[_network(site, n) for n in spec.networks],
        clouds=list(clouds.values()),
        hosts=hosts,
        vms=vms,
    )
    return Discovered(inventory, ips.allocated)


def _folder_nic(site: str, nic: FolderNic, networks: dict[str, NetworkSpec]) -> NicSpec:
    """A vm.json NIC as a site file's: a network id is looked up among this site's networks
    (one it doesn't have: not connected); an address the subnet can't give becomes `static`
    (any free one of the pool), an unknown subnet the network's first (docs/reference.md)."""
    name = nic.network
    if name is None and nic.network_id is not None:
        name = next((n for n in networks if object_id(site, "network", n) == nic.network_id), None)
    if name is None:
        return NicSpec()
    ip: Literal["dhcp", "static"] | ipaddress.IPv4Address = nic.ip or (
        (nic.ip_address or "static") if nic.ip_mode == "static" else "dhcp"
    )
    mode: Literal["dhcp", "static"] = "dhcp" if ip == "dhcp" else "static"
    for spec in (
        NicSpec(network=name, subnet=nic.subnet, ip=ip),
        NicSpec(network=name, subnet=nic.subnet, ip=mode),
        NicSpec(network=name, ip=mode),  # no such subnet: the first
        NicSpec(network=name),
    ):
        if not nic_problems("", spec, networks):
            return spec
    return NicSpec()


def _nth_address(nic: NicSpec, n: int) -> ipaddress.IPv4Address | None:
    return nic.ip + n if isinstance(nic.ip, ipaddress.IPv4Address) else None


def _host(site: str, plan: HostPlan, clouds: dict[str, Cloud]) -> Host:
    cloud = clouds[plan.spec.cloud]
    return Host(
        host_id=object_id(site, "host", plan.name),
        name=plan.name,
        cloud_id=cloud.cloud_id,
        host_group=plan.spec.host_group or cloud.host_groups[0],
        os_version=plan.spec.os_version,
        cpu_count=plan.spec.cpu,
        memory_mb=plan.spec.memory_mb,
        storage_dir=str(plan.storage_dir) if plan.storage_dir else "",
    )


def _network(site: str, net: NetworkSpec) -> VmNetwork:
    return VmNetwork(
        network_id=object_id(site, "network", net.name),
        name=net.name,
        logical_network=net.logical_network,
        isolated=net.isolated,
        subnets=[
            Subnet(
                name=s.name,
                cidr=str(s.cidr),
                static_pool=StaticPool(start=str(s.static_pool.start), end=str(s.static_pool.end))
                if s.static_pool
                else None,
            )
            for s in net.subnets
        ],
    )


def _declared_disks(site: str, vm: str, plan: HostPlan, disks: list[DiskSpec]) -> tuple[Disk, ...]:
    out = []
    for d in disks:
        file_name = f"{d.name}.{d.type.value}"
        path = str(plan.storage_dir / vm / file_name) if plan.storage_dir else ""
        out.append(
            Disk(
                disk_id=object_id(site, "disk", vm, d.name),
                name=file_name,
                size_bytes=d.size,
                type=d.type,
                path=path,
                shared=d.shared,
                encrypted=d.encrypted,
            )
        )
    return tuple(out)


def _folder_disks(site: str, vm: str, found: FolderVm) -> tuple[Disk, ...]:
    return tuple(
        Disk(
            disk_id=object_id(site, "disk", vm, Path(d.name).stem),
            name=d.name,
            size_bytes=d.size_bytes,
            type=DISK_SUFFIXES[Path(d.name).suffix.lower()],
            path=d.path,
        )
        for d in found.disks
    )


def _vm(
    site: str,
    draft: _VmDraft,
    clouds: dict[str, Cloud],
    networks: dict[str, NetworkSpec],
    ips: IpAllocator,
) -> Vm:
    nics = []
    for index, (spec, address) in enumerate(draft.nics):
        nic_id = object_id(site, "nic", draft.name, str(index))
        owner = f"VM '{draft.name}' nics[{index}]"
        problems = nic_problems(owner, spec, networks)  # a folder's vm.json is checked only here
        if problems:
            raise SiteFileError("; ".join(problems))
        if spec.network is None:
            nics.append(Nic(nic_id=nic_id))
            continue
        net = networks[spec.network]
        subnet = net.subnet(spec.subnet)
        assert subnet is not None
        if spec.ip == "dhcp":
            ip, mode = None, IpMode.DHCP
        elif address is not None:
            ip, mode = str(address), IpMode.STATIC
        else:
            ip, mode = ips.allocate(net.name, subnet, nic_id, owner), IpMode.STATIC
        nics.append(
            Nic(
                nic_id=nic_id,
                network_id=object_id(site, "network", net.name),
                subnet=subnet.name,
                ip_mode=mode,
                ip_address=ip,
            )
        )
    return Vm(
        vm_id=object_id(site, "vm", draft.name),
        name=draft.name,
        cloud_id=clouds[draft.host.spec.cloud].cloud_id,
        host_id=object_id(site, "host", draft.host.name),
        generation=draft.generation,
        cpu_count=draft.cpu,
        memory_mb=draft.memory_mb,
        state=draft.state,
        disks=list(draft.disks),
        nics=nics,
    )


def change_between(old: Inventory, new: Inventory) -> tuple[Inventory, Removals]:
    """What a `DiscoveryChange` from `old` to `new` carries: objects added or changed, and ids
    removed. Both empty: nothing changed."""
    before = {(k, object_id_of(o)): content_hash(o) for k, o in old.objects()}
    after = {(k, object_id_of(o)) for k, o in new.objects()}
    upserts = [o for k, o in new.objects() if before.get((k, object_id_of(o))) != content_hash(o)]
    gone = [key for key in before if key not in after]
    return Inventory.of(upserts), removals_of(gone)


def removals_of(keys: list[tuple[Kind, str]]) -> Removals:
    return Removals(
        networks=[i for k, i in keys if k is Kind.NETWORK],
        clouds=[i for k, i in keys if k is Kind.CLOUD],
        hosts=[i for k, i in keys if k is Kind.HOST],
        vms=[i for k, i in keys if k is Kind.VM],
    )


def split_snapshot(
    site: str, sequence: int, inventory: Inventory, max_bytes: int
) -> list[DiscoverySnapshot]:
    """The snapshot as parts whose objects' JSON stays under `max_bytes` each (one part when
    it fits), so every record stays under Kafka's 1 MiB limit."""
    chunks: list[list[InventoryObject]] = [[]]
    size = 0
    for _, obj in inventory.objects():
        n = len(obj.model_dump_json())
        if chunks[-1] and size + n > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(obj)
        size += n
    return [
        DiscoverySnapshot(
            site=site, sequence=sequence, inventory=Inventory.of(c), part=i, parts=len(chunks)
        )
        for i, c in enumerate(chunks, start=1)
    ]


def counts(inventory: Inventory) -> dict[str, int]:
    return {
        "clouds": len(inventory.clouds),
        "hosts": len(inventory.hosts),
        "vms": len(inventory.vms),
        "networks": len(inventory.networks),
    }

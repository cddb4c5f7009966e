"""The site description file (`DR_PROVIDER_SITE_FILE`, YAML or JSON): what this simulated VMM
server manages. Parsed with pydantic; every problem is reported with where it is and what to fix.

Compact by design: `count:` with a `{n}` name pattern (`web-{n:02}`) expands one entry into
many VMs (or hosts); `hosts:` spreads them round-robin; `ip: static` takes the next free address
of the subnet's static pool. Example: deploy/sites/primary.yaml.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from shared.schemas.inventory import DiskType, VmState

NAME = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9{][A-Za-z0-9 ._:{}-]*$")
PATTERN = re.compile(r"\{n(?::0?(\d{1,2})d?)?\}")
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
UNITS |= {"kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}


class SiteFileError(ValueError):
    """The site description is unusable; the message says where and what to fix."""


def _size_bytes(value: Any) -> Any:
    if isinstance(value, str):
        match = SIZE.match(value)
        if not match:
            raise ValueError(f"'{value}' is not a size: write e.g. 40GiB, 512MiB, 1TiB or bytes")
        return int(float(match[1]) * UNITS[(match[2] or "b").lower()])
    return value


SizeBytes = Annotated[int, BeforeValidator(_size_bytes), Field(gt=0, le=64 * 2**40)]


def expand_name(pattern: str, n: int) -> str:
    """`web-{n:02}` with n=3 -> `web-03`."""
    return PATTERN.sub(lambda m: str(n).zfill(int(m[1] or 0)), pattern)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Counted(Strict):
    """An entry that may stand for several objects: `count` copies named by the `{n}` pattern."""

    name: str = NAME
    count: int = Field(default=1, ge=1, le=10_000)
    start: int = Field(default=1, ge=0, description="First value of {n}.")

    @model_validator(mode="after")
    def _pattern_when_counted(self) -> Counted:
        if self.count > 1 and not PATTERN.search(self.name):
            raise ValueError(
                f"name '{self.name}' has count {self.count} but no {{n}} placeholder: "
                "write e.g. 'web-{n:02}'"
            )
        if "{" in PATTERN.sub("", self.name):
            raise ValueError(f"name '{self.name}': the only placeholder is {{n}} or {{n:02}}")
        return self

    def names(self) -> list[str]:
        return [expand_name(self.name, self.start + i) for i in range(self.count)]


class PoolSpec(Strict):
    start: ipaddress.IPv4Address
    end: ipaddress.IPv4Address

    @model_validator(mode="after")
    def _ordered(self) -> PoolSpec:
        if self.start > self.end:
            raise ValueError(f"static pool start {self.start} is after its end {self.end}")
        return self


class SubnetSpec(Strict):
    name: str = NAME
    cidr: ipaddress.IPv4Network
    static_pool: PoolSpec | None = None

    @model_validator(mode="after")
    def _pool_in_subnet(self) -> SubnetSpec:
        pool = self.static_pool
        if pool and (pool.start not in self.cidr or pool.end not in self.cidr):
            raise ValueError(f"static pool {pool.start}-{pool.end} is not inside {self.cidr}")
        return self


class NetworkSpec(Strict):
    name: str = NAME
    logical_network: str = ""
    subnets: list[SubnetSpec] = Field(default_factory=list, max_length=256)
    isolated: bool = False

    def subnet(self, name: str | None) -> SubnetSpec | None:
        if name is None:
            return self.subnets[0] if self.subnets else None
        return next((s for s in self.subnets if s.name == name), None)


class CloudSpec(Strict):
    name: str = NAME
    host_groups: list[str] = Field(default_factory=list, max_length=100)
    capability_profiles: list[str] = Field(default_factory=lambda: ["Hyper-V"], max_length=20)
    capacity_vms: int = Field(default=1000, ge=0)


class HostSpec(Counted):
    cloud: str
    host_group: str | None = Field(default=None, description="Default: the cloud's first.")
    os_version: str = Field(default="Windows Server 2022", min_length=1, max_length=100)
    cpu: int = Field(default=16, ge=1)
    memory_mb: int = Field(default=131072, ge=1)
    storage_dir: str | None = Field(
        default=None,
        description="VM storage folder ({name} = host name); relative to the storage root.",
    )


class DiskSpec(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    size: SizeBytes
    type: DiskType = DiskType.VHDX
    shared: bool = False
    encrypted: bool = False


class NicSpec(Strict):
    network: str | None = Field(default=None, description="VM network; omitted: unconnected.")
    subnet: str | None = Field(default=None, description="Default: the network's first subnet.")
    ip: Literal["dhcp", "static"] | ipaddress.IPv4Address = Field(
        default="dhcp",
        description="dhcp, static (next free address of the pool), or an address (consecutive "
        "addresses for a counted entry).",
    )


def _default_disks() -> list[DiskSpec]:
    return [DiskSpec(name="os", size=40 * 2**30)]


class VmSpec(Counted):
    host: str | None = None
    hosts: list[str] | None = Field(default=None, min_length=1, description="Round-robin.")
    generation: Literal[1, 2] = 2
    cpu: int = Field(default=2, ge=1, le=240)
    memory_mb: int = Field(default=4096, ge=32)
    state: VmState = VmState.RUNNING
    disks: list[DiskSpec] = Field(default_factory=_default_disks, max_length=256)
    nics: list[NicSpec] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _one_placement(self) -> VmSpec:
        if (self.host is None) == (self.hosts is None):
            raise ValueError("give exactly one of 'host' or 'hosts'")
        names = [d.name for d in self.disks]
        if len(set(names)) != len(names):
            raise ValueError(f"disk names repeat: {names}")
        return self

    def placement(self) -> list[str]:
        return [self.host] if self.host is not None else list(self.hosts or [])


class FolderNic(BaseModel):
    """A NIC in a folder's `vm.json`: like a site file's (`network` by name, `ip`), or as the
    host agent records a NIC attachment of a VM it created (`network_id`, `ip_mode`,
    `ip_address`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    network: str | None = None
    network_id: str | None = None
    subnet: str | None = None
    ip: Literal["dhcp", "static"] | ipaddress.IPv4Address | None = None
    ip_mode: Literal["dhcp", "static"] | None = None
    ip_address: ipaddress.IPv4Address | None = None


class FolderVmMeta(BaseModel):
    """`<storage_dir>/<vm>/vm.json`, all optional; other keys are ignored (the host agent may
    keep its own notes there)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    generation: Literal[1, 2] = 2
    cpu: int = Field(default=2, ge=1, le=240)
    memory_mb: int = Field(default=4096, ge=32)
    state: VmState = VmState.RUNNING
    nics: list[FolderNic] = Field(default_factory=list, max_length=64)


class SiteSpec(Strict):
    site: str | None = Field(default=None, description="If given, must equal DR_PROVIDER_SITE.")
    clouds: list[CloudSpec] = Field(default_factory=list)
    networks: list[NetworkSpec] = Field(default_factory=list)
    hosts: list[HostSpec] = Field(default_factory=list)
    vms: list[VmSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> SiteSpec:
        problems: list[str] = []
        clouds = _unique("cloud", [c.name for c in self.clouds], problems)
        _unique("network", [n.name for n in self.networks], problems)
        hosts = _unique("host", [h for spec in self.hosts for h in spec.names()], problems)
        _unique("VM", [v for spec in self.vms for v in spec.names()], problems)
        cloud_by_name = {c.name: c for c in self.clouds}
        net_by_name = {n.name: n for n in self.networks}
        for host in self.hosts:
            cloud = cloud_by_name.get(host.cloud)
            if cloud is None:
                problems.append(
                    f"host '{host.name}': unknown cloud '{host.cloud}' (known: {sorted(clouds)})"
                )
            elif host.host_group is None and not cloud.host_groups:
                problems.append(
                    f"host '{host.name}': cloud '{cloud.name}' has no host_groups; "
                    "give the host a host_group or the cloud host_groups"
                )
            elif (
                host.host_group is not None
                and cloud.host_groups
                and host.host_group not in cloud.host_groups
            ):
                problems.append(
                    f"host '{host.name}': host_group '{host.host_group}' is not one of "
                    f"cloud '{cloud.name}' host_groups {cloud.host_groups}"
                )
        for vm in self.vms:
            for h in vm.placement():
                if h not in hosts:
                    problems.append(f"VM '{vm.name}': unknown host '{h}' (known: {sorted(hosts)})")
            for i, nic in enumerate(vm.nics):
                problems.extend(nic_problems(f"VM '{vm.name}' nics[{i}]", nic, net_by_name))
        if problems:
            raise ValueError("; ".join(problems))
        return self


def nic_problems(where: str, nic: NicSpec, networks: dict[str, NetworkSpec]) -> list[str]:
    if nic.network is None:
        return [f"{where}: an unconnected NIC can't have an IP"] if nic.ip != "dhcp" else []
    net = networks.get(nic.network)
    if net is None:
        return [f"{where}: unknown network '{nic.network}' (known: {sorted(networks)})"]
    subnet = net.subnet(nic.subnet)
    if subnet is None:
        return [f"{where}: network '{net.name}' has no subnet '{nic.subnet or '(any)'}'"]
    if nic.ip == "static" and subnet.static_pool is None:
        return [f"{where}: ip static but subnet '{subnet.name}' has no static_pool"]
    if isinstance(nic.ip, ipaddress.IPv4Address) and nic.ip not in subnet.cidr:
        return [f"{where}: {nic.ip} is not inside subnet '{subnet.name}' {subnet.cidr}"]
    return []


def _unique(what: str, names: list[str], problems: list[str]) -> set[str]:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            problems.append(f"{what} name '{name}' is used twice")
        seen.add(name)
    return seen


def parse_site(text: str, source: str = "site file") -> SiteSpec:
    """Parse YAML (JSON is a subset) into a `SiteSpec`; `SiteFileError` says what to fix."""
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise SiteFileError(f"{source}: not valid YAML/JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SiteFileError(
            f"{source}: the top level must be a mapping with clouds, networks, hosts, vms"
        )
    try:
        return SiteSpec.model_validate(raw)
    except ValidationError as exc:
        raise SiteFileError(f"{source}: {_messages(exc)}") from None


def read_site(path: Path) -> SiteSpec:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SiteFileError(f"{path}: can't read the site file: {exc.strerror}") from None
    return parse_site(text, str(path))


def parse_folder_meta(text: str) -> FolderVmMeta:
    try:
        return FolderVmMeta.model_validate(json.loads(text) if text.strip() else {})
    except json.JSONDecodeError as exc:
        raise SiteFileError(f"not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise SiteFileError(_messages(exc)) from None


def _messages(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)

"""Where a failed-over NIC lands (docs/reference.md "Network mapping"): the policy service shows it
for protected VMs, the failover service applies it when it creates a recovery VM. Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from shared.schemas.inventory import IpMode, Nic, VmNetwork


@dataclass(frozen=True)
class NicTarget:
    """Where a NIC is connected after failover (`connected` False: to no network)."""

    nic_id: str
    connected: bool
    network_id: str | None
    subnet: str | None
    ip_mode: IpMode
    ip_address: str | None
    note: str


def failover_nic_target(
    nic: Nic, target_network: VmNetwork | None, used_ips: AbstractSet[str] = frozenset()
) -> NicTarget:
    """The failed-over NIC of `nic`, given the target network its network maps to.

    Unmapped (or unconnected) NIC: connected to no network. Target subnet: the one named like
    the source subnet, else the first. DHCP: the address is not managed. Static: keep the same
    address if the target subnet's pool has it free, else the first free address of the pool.
    """
    if nic.network_id is None or target_network is None:
        why = "the NIC is not connected" if nic.network_id is None else "its network is unmapped"
        return NicTarget(nic.nic_id, False, None, None, nic.ip_mode, None, f"not connected: {why}")
    subnets = target_network.subnets
    subnet = next((s for s in subnets if s.name == nic.subnet), subnets[0] if subnets else None)
    base = NicTarget(
        nic.nic_id,
        True,
        target_network.network_id,
        subnet.name if subnet else None,
        nic.ip_mode,
        None,
        "",
    )
    if nic.ip_mode is IpMode.DHCP:
        return _with(base, note="DHCP: the address is not managed")
    if subnet is None or subnet.static_pool is None:
        return _with(base, note="the target network has no static IP pool: no address assigned")
    try:
        start = ipaddress.IPv4Address(subnet.static_pool.start)
        end = ipaddress.IPv4Address(subnet.static_pool.end)
    except ValueError:
        return _with(base, note=f"the static pool of subnet '{subnet.name}' is not valid")
    used = {_ipv4(ip) for ip in used_ips} - {None}
    same = _ipv4(nic.ip_address)
    if same is not None and start <= same <= end and same not in used:
        return _with(base, ip_address=str(same), note="same address as the source")
    candidate = start
    while candidate <= end:
        if candidate not in used:
            return _with(base, ip_address=str(candidate), note="a free address of the target pool")
        if candidate == end:
            break
        candidate += 1
    return _with(base, note=f"no free address in the pool of subnet '{subnet.name}'")


def _ipv4(text: str | None) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(text) if text else None
    except ValueError:
        return None


def _with(base: NicTarget, *, ip_address: str | None = None, note: str) -> NicTarget:
    return NicTarget(
        base.nic_id,
        base.connected,
        base.network_id,
        base.subnet,
        base.ip_mode,
        ip_address,
        note,
    )

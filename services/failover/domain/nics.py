"""Network mappings and the recovery VM's NICs: by mapping and the IP rules, or all on the
test network for a test failover (docs/reference.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from shared.networking import failover_nic_target
from shared.schemas.agent import NicAttachment
from shared.schemas.inventory import Nic, VmNetwork


@dataclass(frozen=True)
class NetworkMapping:
    """A network mapping: NICs on the source network fail over to the target network."""

    source_network_id: str
    target_network_id: str


def mapped_network(
    network_id: str | None,
    mappings: Sequence[NetworkMapping],
    networks: Mapping[str, VmNetwork],
) -> VmNetwork | None:
    """The target network a NIC's network maps to. A mapping also works backwards (failback:
    a NIC on the mapping's target network lands on its source network)."""
    if network_id is None:
        return None
    for m in mappings:
        if m.source_network_id == network_id:
            return networks.get(m.target_network_id)
    for m in mappings:
        if m.target_network_id == network_id:
            return networks.get(m.source_network_id)
    return None


def failover_nics(
    nics: Sequence[Nic],
    mappings: Sequence[NetworkMapping],
    networks: Mapping[str, VmNetwork],
    used_ips: AbstractSet[str],
    test_network: VmNetwork | None = None,
    test: bool = False,
) -> list[NicAttachment]:
    """The recovery VM's NICs: by network mapping and the IP rules (docs/reference.md), or, for a
    test failover, all on the test network (none: not connected)."""
    used = set(used_ips)
    out = []
    for nic in nics:
        target = test_network if test else mapped_network(nic.network_id, mappings, networks)
        placed = failover_nic_target(nic, target, used)
        if placed.ip_address:
            used.add(placed.ip_address)
        out.append(
            NicAttachment(
                nic_id=nic.nic_id,
                network_id=placed.network_id if placed.connected else None,
                subnet=placed.subnet,
                ip_mode=placed.ip_mode.value,
                ip_address=placed.ip_address,
            )
        )
    return out

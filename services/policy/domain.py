"""Policy rules: policies, cloud pairings, network mappings, enable-replication prerequisites and
where a failed-over NIC lands. Pure, synchronous, no I/O: handlers load the facts, these
functions decide, handlers persist."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from shared.networking import NicTarget, failover_nic_target
from shared.schemas.inventory import Vm
from shared.schemas.policy import ReplicationPolicySettings
from shared.schemas.registration import ConnectionState

MAX_DISKS = 16


class PolicyError(Exception):
    """A refused request; `status` is the HTTP status it maps to."""

    status = 422

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(PolicyError):
    status = 404


class Conflict(PolicyError):
    status = 409


class Invalid(PolicyError):
    status = 422


# ------------------------------------------------------------------------------ facts


@dataclass(frozen=True)
class CloudFacts:
    cloud_id: str
    name: str
    site: str
    provider_id: uuid.UUID | None
    host_groups: tuple[str, ...]
    capacity_vms: int


@dataclass(frozen=True)
class ProviderFacts:
    producer_id: uuid.UUID
    name: str
    site: str
    active: bool
    connection_state: str | None


@dataclass(frozen=True)
class PairingFacts:
    pairing_id: uuid.UUID
    source_cloud_id: str
    source_site: str
    target_cloud_id: str
    target_site: str
    policy_id: uuid.UUID


@dataclass(frozen=True)
class NetworkFacts:
    network_id: str
    name: str
    site: str


# ------------------------------------------------------------------------------ policies


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one line: `field: what is wrong; ...`."""
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = f"unknown setting '{loc}': remove it"
            loc = ""
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def check_schedule(settings: ReplicationPolicySettings, now: datetime) -> None:
    """A scheduled initial replication starts between now and 24 h ahead (checked on save)."""
    problem = settings.schedule_problem(now)
    if problem:
        raise Invalid(problem)


def updated_settings(
    current: ReplicationPolicySettings, changes: Mapping[str, Any]
) -> ReplicationPolicySettings:
    """`current` with `changes` applied, validated as a whole.

    Changing the authentication without a port takes the new method's default port; choosing
    a non-scheduled/non-offline initial replication drops the settings only those use.
    """
    merged = current.model_dump(mode="json")
    if "authentication" in changes and "port" not in changes:
        merged.pop("port", None)
    if "initial_replication" in changes:
        method = changes["initial_replication"]
        if method != "online_scheduled" and "initial_replication_start_at" not in changes:
            merged["initial_replication_start_at"] = None
        if method != "offline":
            for key in ("offline_export_path", "offline_import_path"):
                if key not in changes:
                    merged[key] = None
    merged.update(changes)
    try:
        return ReplicationPolicySettings.model_validate(merged)
    except ValidationError as exc:
        raise Invalid(f"invalid policy settings: {validation_message(exc)}") from None


def check_policy_deletable(name: str, used_by: Sequence[PairingFacts]) -> None:
    if used_by:
        pairs = ", ".join(
            f"{p.pairing_id} ({p.source_cloud_id} -> {p.target_cloud_id})" for p in used_by
        )
        raise Conflict(
            f"policy '{name}' is used by {len(used_by)} cloud pairing(s): {pairs}; "
            "remove those pairings first"
        )


# ------------------------------------------------------------------------------ pairings


def check_pairing(
    *,
    source_cloud_id: str,
    target_cloud_id: str,
    source: CloudFacts | None,
    target: CloudFacts | None,
    target_provider: ProviderFacts | None,
    host_os_versions: AbstractSet[str],
    policy_name: str,
    policy: ReplicationPolicySettings,
    existing: Sequence[PairingFacts],
) -> None:
    """Every rule a new pairing source -> target must satisfy; raises the first one broken.

    `host_os_versions`: the OS versions of all hosts in both clouds.
    """
    if source_cloud_id == target_cloud_id:
        raise Invalid(
            f"source and target are the same cloud '{source_cloud_id}': pair two distinct "
            "clouds (a single-site setup needs at least two clouds)"
        )
    for role, cloud_id, cloud in (
        ("source", source_cloud_id, source),
        ("target", target_cloud_id, target),
    ):
        if cloud is None:
            raise NotFound(
                f"{role} cloud '{cloud_id}' is not in this vault's inventory: check the id "
                "(drctl inventory clouds) and that its site provider synchronised it"
            )
    assert source is not None and target is not None
    for role, cloud in (("source", source), ("target", target)):
        if not cloud.host_groups:
            raise Conflict(
                f"{role} cloud '{cloud.name}' ({cloud.cloud_id}) contains no host groups: "
                "add a host group to the cloud in VMM and let the provider synchronise it"
            )
    for cloud in (source, target):
        for p in existing:
            if cloud.cloud_id in (p.source_cloud_id, p.target_cloud_id):
                side = "source" if cloud.cloud_id == p.source_cloud_id else "target"
                raise Conflict(
                    f"cloud '{cloud.name}' ({cloud.cloud_id}) is already in pairing "
                    f"{p.pairing_id} as {side}: a cloud belongs to at most one pairing"
                )
    if target_provider is None or not target_provider.active:
        raise Conflict(
            f"no site provider is registered for the target site '{target.site}': register "
            "the target VMM server's provider in this vault first"
        )
    if target_provider.connection_state != ConnectionState.CONNECTED.value:
        state = target_provider.connection_state or "never connected"
        raise Conflict(
            f"the target site provider '{target_provider.name}' is {state}: it must be "
            "Connected (check the provider service and its heartbeats)"
        )
    if len(host_os_versions) > 1:
        raise Conflict(
            "hosts of the two clouds run different OS versions "
            f"({', '.join(sorted(host_os_versions))}): all hosts of a pairing must run one "
            "host OS version"
        )
    wanted = policy.target_host_os_version
    if wanted and host_os_versions and wanted not in host_os_versions:
        raise Conflict(
            f"policy '{policy_name}' targets host OS version '{wanted}' but the clouds' hosts "
            f"run '{next(iter(host_os_versions))}': use a policy for that version"
        )


def check_unpair(pairing: PairingFacts, protected_count: int) -> None:
    if protected_count:
        raise Conflict(
            f"pairing {pairing.pairing_id} cannot be removed: {protected_count} VM(s) of source "
            f"cloud '{pairing.source_cloud_id}' are protected; disable their protection first"
        )


# ------------------------------------------------------------------------------ network mappings


def check_mapping(
    *,
    source_network_id: str,
    target_network_id: str,
    source: NetworkFacts | None,
    target: NetworkFacts | None,
    pairings: Sequence[PairingFacts],
    existing: uuid.UUID | None,
) -> None:
    """A mapping source -> target: both networks known, on the two sides of an existing pairing,
    one mapping per source network (`existing`: the mapping id that already maps the source)."""
    if source_network_id == target_network_id:
        raise Invalid(
            f"source and target are the same network '{source_network_id}': map to a "
            "network at the recovery side"
        )
    if source is None:
        raise NotFound(f"source network '{source_network_id}' is not in this vault's inventory")
    if target is None:
        raise NotFound(f"target network '{target_network_id}' is not in this vault's inventory")
    check_mapping_sites(source, target, pairings)
    if existing is not None:
        raise Conflict(
            f"source network '{source.name}' ({source.network_id}) is already mapped by "
            f"mapping {existing}: a source network has one mapping; change or delete it"
        )


def check_mapping_sites(
    source: NetworkFacts, target: NetworkFacts, pairings: Sequence[PairingFacts]
) -> None:
    if not any(p.source_site == source.site and p.target_site == target.site for p in pairings):
        raise Conflict(
            f"no cloud pairing goes from site '{source.site}' (source network "
            f"'{source.name}') to site '{target.site}' (target network '{target.name}'): pair "
            "a cloud of the source site with a cloud of the target site first"
        )


# ------------------------------------------------------------------------------ prerequisites


class CheckStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WARNING = "warning"


@dataclass(frozen=True)
class Check:
    rule: str
    status: CheckStatus
    message: str


def prerequisite_checks(
    vm_id: str,
    vm: Vm | None,
    *,
    pairing: PairingFacts | None,
    mapped_networks: Mapping[str, str],
    protected: bool,
    target: CloudFacts | None,
    protected_in_target: int,
) -> list[Check]:
    """The enable-replication checks for one VM (`mapped_networks`: source -> target network)."""
    if vm is None:
        return [
            Check(
                "vm_exists",
                CheckStatus.FAIL,
                f"VM '{vm_id}' is not in this vault's inventory",
            )
        ]
    checks = [Check("vm_exists", CheckStatus.PASS, f"VM '{vm.name}' found")]
    if pairing is None:
        checks.append(
            Check(
                "cloud_paired",
                CheckStatus.FAIL,
                f"the VM's cloud '{vm.cloud_id}' is not the source of a cloud pairing: pair it "
                "with a target cloud first",
            )
        )
    else:
        checks.append(
            Check(
                "cloud_paired",
                CheckStatus.PASS,
                f"cloud '{vm.cloud_id}' is paired with '{pairing.target_cloud_id}'",
            )
        )
    n = len(vm.disks)
    checks.append(
        Check("disk_count", CheckStatus.PASS, f"{n} disk(s) (at most {MAX_DISKS})")
        if n <= MAX_DISKS
        else Check(
            "disk_count",
            CheckStatus.FAIL,
            f"the VM has {n} disks; at most {MAX_DISKS} are supported",
        )
    )
    shared = [d.name for d in vm.disks if d.shared]
    checks.append(
        Check(
            "no_shared_disk",
            CheckStatus.FAIL,
            f"shared (cluster) disks are not supported: {', '.join(shared)}",
        )
        if shared
        else Check("no_shared_disk", CheckStatus.PASS, "no shared disk")
    )
    encrypted = [d.name for d in vm.disks if d.encrypted]
    checks.append(
        Check(
            "no_encrypted_disk",
            CheckStatus.FAIL,
            f"encrypted disks are not supported: {', '.join(encrypted)}",
        )
        if encrypted
        else Check("no_encrypted_disk", CheckStatus.PASS, "no encrypted disk")
    )
    unmapped = [
        f"{nic.nic_id} (network {nic.network_id})"
        for nic in vm.nics
        if nic.network_id is not None and nic.network_id not in mapped_networks
    ]
    checks.append(
        Check(
            "networks_mapped",
            CheckStatus.WARNING,
            f"NIC(s) without a network mapping: {', '.join(unmapped)}; after failover they "
            "will be connected to no network",
        )
        if unmapped
        else Check("networks_mapped", CheckStatus.PASS, "every NIC's network is mapped")
    )
    checks.append(
        Check("not_protected", CheckStatus.FAIL, "the VM is already protected")
        if protected
        else Check("not_protected", CheckStatus.PASS, "the VM is not protected yet")
    )
    if target is None:
        checks.append(
            Check(
                "target_capacity",
                CheckStatus.FAIL,
                "no target cloud: the VM's cloud is not paired"
                if pairing is None
                else f"target cloud '{pairing.target_cloud_id}' is not in the inventory",
            )
        )
    elif target.capacity_vms > protected_in_target:
        checks.append(
            Check(
                "target_capacity",
                CheckStatus.PASS,
                f"target cloud '{target.name}' can host {target.capacity_vms} VMs, "
                f"{protected_in_target} protected into it",
            )
        )
    else:
        checks.append(
            Check(
                "target_capacity",
                CheckStatus.FAIL,
                f"target cloud '{target.name}' is full: capacity {target.capacity_vms} VMs, "
                f"{protected_in_target} already protected into it",
            )
        )
    return checks


def prerequisites_ok(checks: Sequence[Check]) -> bool:
    return all(c.status is not CheckStatus.FAIL for c in checks)


# Where a failed-over NIC lands: shared with the failover service.
__all__ = ["NicTarget", "failover_nic_target"]

"""Policy contract: replication policies, cloud pairings, network mappings and the
enable-replication prerequisite verdict of each VM, emitted by the policy service on
`policy.events.v1` (keyed by vault id, so one vault's changes stay ordered).

`ReplicationPolicySettings` holds every setting of the product's replication policy, validated
with messages that say what to fix. It checks only what is true at any time; the rule that a
scheduled initial replication starts within the next 24 h depends on the clock and is checked
when a policy is saved (`ReplicationPolicySettings.schedule_problem`), never when an event is
read back later.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Literal

from pydantic import AwareDatetime, Field, model_validator

from shared import topics
from shared.schemas.envelope import EventPayload
from shared.schemas.registry import event_type

PRODUCT_COPY_FREQUENCIES = (30, 300, 900)
"""The product's copy frequencies (30 s, 5 min, 15 min); any whole second 1..3600 is ours."""
PRODUCT_MAX_RECOVERY_POINTS = 24
"""The product keeps at most 24 additional hourly recovery points; we allow up to 168 (7 days)."""
MAX_RECOVERY_POINTS = 168
MAX_APP_CONSISTENT_HOURS = 12
MAX_SCHEDULE_AHEAD = timedelta(hours=24)


class Authentication(StrEnum):
    CERTIFICATE = "certificate"
    KERBEROS = "kerberos"


DEFAULT_PORTS = {Authentication.CERTIFICATE: 8084, Authentication.KERBEROS: 8083}


class InitialReplication(StrEnum):
    ONLINE_NOW = "online_now"
    ONLINE_SCHEDULED = "online_scheduled"
    OFFLINE = "offline"


class ReplicationPolicySettings(EventPayload):
    """Every setting of a replication policy.

    - `copy_frequency_seconds`: how often changes are shipped. The product's values are 30, 300
      (the default) and 900; as our extension any whole number of seconds from 1 to 3600.
    - `recovery_points`: additional hourly recovery points kept, 0..24 in the product; as our
      extension up to 168 (7 days).
    - `app_consistent_frequency_hours`: 0 (off) or 1..12, strictly less than `recovery_points`.
    - `compression`: compress data transferred.
    - `authentication` + `port`: certificate (recommended, default port 8084) or kerberos
      (default port 8083); port 1..65535.
    - `initial_replication`: `online_now`, `online_scheduled` (with `initial_replication_start_at`
      at most 24 h ahead, not in the past, checked when saved) or `offline` (with
      `offline_export_path` at the source and `offline_import_path` at the target).
    - `delete_replica_on_disable`: delete the replica VM when protection is disabled.
    - `target_host_os_version`: the host OS version the policy targets (None: any, but still one
      version across a pairing's hosts).
    """

    copy_frequency_seconds: int = Field(
        default=300,
        description="Seconds between delta cycles: product values 30, 300, 900; ours 1..3600.",
    )
    recovery_points: int = Field(
        default=0, description="Additional hourly recovery points kept (0..24 product, ..168 ours)."
    )
    app_consistent_frequency_hours: int = Field(
        default=0, description="App-consistent snapshot every N hours; 0 = off, else 1..12."
    )
    compression: bool = Field(default=True)
    authentication: Authentication = Field(default=Authentication.CERTIFICATE)
    port: int = Field(
        default=0, description="1..65535; default 8084 (certificate), 8083 (kerberos)"
    )
    initial_replication: InitialReplication = Field(default=InitialReplication.ONLINE_NOW)
    initial_replication_start_at: AwareDatetime | None = None
    offline_export_path: str | None = Field(default=None, max_length=1024)
    offline_import_path: str | None = Field(default=None, max_length=1024)
    delete_replica_on_disable: bool = False
    target_host_os_version: str | None = Field(default=None, min_length=1, max_length=100)

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("port") is None:
            auth = data.get("authentication") or Authentication.CERTIFICATE
            if auth in DEFAULT_PORTS:  # else the field validator reports the bad value
                data = {**data, "port": DEFAULT_PORTS[Authentication(auth)]}
        return data

    @model_validator(mode="after")
    def _rules(self) -> ReplicationPolicySettings:
        problems = settings_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def schedule_problem(self, now: datetime) -> str | None:
        """What is wrong with a scheduled start at `now` (checked when a policy is saved)."""
        start = self.initial_replication_start_at
        if self.initial_replication is not InitialReplication.ONLINE_SCHEDULED or start is None:
            return None
        if start < now:
            return (
                f"initial_replication_start_at {start.isoformat()} is in the past: "
                "schedule it between now and 24 h ahead, or use online_now"
            )
        if start - now > MAX_SCHEDULE_AHEAD:
            return (
                f"initial_replication_start_at {start.isoformat()} is more than 24 h ahead: "
                "a scheduled initial replication starts within the next 24 h"
            )
        return None


def path_problem(name: str, path: str | None) -> str | None:
    """A folder setting must be absolute (POSIX `/...`, Windows `X:\\...` or `\\\\server\\share`)
    and without `..` components: an agent resolves it on its own host, where a relative or
    climbing path would land somewhere else than the operator meant."""
    if not (path or "").strip():
        return None
    assert path is not None
    if not (PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute()):
        return f"{name} must be an absolute path (e.g. /exports/dr), got {path!r}"
    if ".." in PureWindowsPath(path).parts or ".." in PurePosixPath(path).parts:
        return f"{name} must not contain '..' components, got {path!r}: name the folder itself"
    return None


def settings_problems(s: ReplicationPolicySettings) -> list[str]:
    """Every rule a policy breaks, each as a message that says what to fix."""
    out: list[str] = []
    if not 1 <= s.copy_frequency_seconds <= 3600:
        out.append(
            f"copy_frequency_seconds must be a whole number of seconds from 1 to 3600 "
            f"(the product's values are 30, 300, 900), got {s.copy_frequency_seconds}"
        )
    if not 0 <= s.recovery_points <= MAX_RECOVERY_POINTS:
        out.append(
            f"recovery_points must be 0..{MAX_RECOVERY_POINTS} additional hourly points "
            f"(the product allows up to {PRODUCT_MAX_RECOVERY_POINTS}), got {s.recovery_points}"
        )
    freq = s.app_consistent_frequency_hours
    if not 0 <= freq <= MAX_APP_CONSISTENT_HOURS:
        out.append(
            "app_consistent_frequency_hours must be 0 (off) or 1..12 hours, "
            f"got {s.app_consistent_frequency_hours}"
        )
    elif freq > 0 and freq >= s.recovery_points:
        out.append(
            f"app_consistent_frequency_hours ({freq}) must be less than recovery_points "
            f"({s.recovery_points}): keep more recovery points or snapshot less often"
        )
    if not 1 <= s.port <= 65535:
        out.append(f"port must be 1..65535, got {s.port}")
    scheduled = s.initial_replication is InitialReplication.ONLINE_SCHEDULED
    offline = s.initial_replication is InitialReplication.OFFLINE
    if scheduled and s.initial_replication_start_at is None:
        out.append("initial_replication online_scheduled needs initial_replication_start_at")
    if not scheduled and s.initial_replication_start_at is not None:
        out.append(
            "initial_replication_start_at is only used with initial_replication online_scheduled"
        )
    if offline:
        if not (s.offline_export_path or "").strip():
            out.append(
                "initial_replication offline needs offline_export_path (where the source exports)"
            )
        if not (s.offline_import_path or "").strip():
            out.append(
                "initial_replication offline needs offline_import_path (where the target imports)"
            )
        for name in ("offline_export_path", "offline_import_path"):
            problem = path_problem(name, getattr(s, name))
            if problem:
                out.append(problem)
    elif s.offline_export_path is not None or s.offline_import_path is not None:
        out.append(
            "offline_export_path and offline_import_path are only used with "
            "initial_replication offline"
        )
    return out


class Policy(EventPayload):
    """A replication policy of a vault; `version` grows with every update."""

    policy_id: uuid.UUID
    name: str = Field(min_length=1, max_length=100)
    settings: ReplicationPolicySettings
    version: int = Field(ge=1)
    created_at: datetime
    updated_at: datetime


class CloudPairing(EventPayload):
    """Source cloud -> target cloud, replicated with `policy_id`."""

    pairing_id: uuid.UUID
    source_cloud_id: str
    source_site: str
    target_cloud_id: str
    target_site: str
    policy_id: uuid.UUID
    created_at: datetime


class NetworkMapping(EventPayload):
    """Source VM network -> target VM network; a failed-over NIC lands on the target."""

    mapping_id: uuid.UUID
    source_network_id: str
    source_site: str
    target_network_id: str
    target_site: str
    created_at: datetime
    updated_at: datetime


@event_type("PolicyCreated", topic=topics.POLICY_EVENTS)
class PolicyCreated(EventPayload):
    """A replication policy was created."""

    policy: Policy


@event_type("PolicyUpdated", topic=topics.POLICY_EVENTS)
class PolicyUpdated(EventPayload):
    """A policy changed; protected items of the listed pairings re-apply its settings."""

    policy: Policy
    pairing_ids: list[uuid.UUID] = Field(default_factory=list)


@event_type("PolicyDeleted", topic=topics.POLICY_EVENTS)
class PolicyDeleted(EventPayload):
    """A policy was deleted (no pairing used it)."""

    policy: Policy


@event_type("CloudPairingCreated", topic=topics.POLICY_EVENTS)
class CloudPairingCreated(EventPayload):
    """A source cloud was paired with a target cloud under a policy."""

    pairing: CloudPairing


@event_type("CloudPairingRemoved", topic=topics.POLICY_EVENTS)
class CloudPairingRemoved(EventPayload):
    """A cloud pairing was removed (no item of its source cloud was protected)."""

    pairing: CloudPairing


@event_type("NetworkMappingCreated", topic=topics.POLICY_EVENTS)
class NetworkMappingCreated(EventPayload):
    """A source VM network was mapped to a target VM network."""

    mapping: NetworkMapping


@event_type("NetworkMappingChanged", topic=topics.POLICY_EVENTS)
class NetworkMappingChanged(EventPayload):
    """A mapping's target network changed; protected items re-apply it."""

    mapping: NetworkMapping
    previous_target_network_id: str


@event_type("NetworkMappingRemoved", topic=topics.POLICY_EVENTS)
class NetworkMappingRemoved(EventPayload):
    """A network mapping was removed; failed-over NICs of that network stay unconnected."""

    mapping: NetworkMapping


class PrerequisiteCheck(EventPayload):
    """One enable-replication check of a VM: `fail` refuses enabling, `warning` does not."""

    rule: str = Field(min_length=1, max_length=100)
    status: Literal["pass", "fail", "warning"]
    message: str = Field(max_length=2000)


@event_type("PrerequisitesEvaluated", topic=topics.POLICY_EVENTS)
class PrerequisitesEvaluated(EventPayload):
    """A VM's enable-replication prerequisite verdict changed. Published whenever something it
    depends on changes (the VM in the inventory, its cloud's pairing, the target cloud's
    capacity and the VMs protected into it, network mappings), and only when the verdict
    differs from the last one; `revision` grows by one with every verdict of the VM, so a
    consumer keeps the highest. The replication service answers enable requests from it."""

    vm_id: str = Field(min_length=1, max_length=100)
    ok: bool
    checks: list[PrerequisiteCheck]
    revision: int = Field(ge=1)

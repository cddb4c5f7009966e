"""One active replication instance per deployment (a database schema and a topic prefix): the
rules, pure. The process side (the lock, the store's identity file, the takeover) is
`services/replication/standby.py`; the queries are `instance_repository`.

The recovery points of a deployment live in one replica store (the folder
`DR_REPLICATION_STORE_DIR`), known by the identity at its root. The instance that holds the
deployment's lock is the active one: it consumes the delta pipeline and runs the periodic
work. Any other instance is a standby; when the lock comes free it takes over only with the
store the deployment's points live in (its own store's identity is the recorded one), or when
the deployment protects nothing yet. A standby with another store is refused: it would find
none of the points its cycles build on.

An instance that takes the lock from one that did not release it (killed, or cut off from
its lock connection while it still runs, until its next check) waits, holding the lock,
until that one missed two heartbeats: by then a live one has noticed and stopped. No wait
when that one ran on the same host and its process is gone (a restart after a crash).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Role(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"  # another instance holds the lock
    REFUSED = "refused"  # the lock is free, but this instance's store is not the deployment's


@dataclass(frozen=True)
class ActiveInstance:
    """The deployment's record: the store its points live in, and the instance that was last
    active (it may have died since: the lock says whether one is active now)."""

    store_id: uuid.UUID
    host: str
    pid: int
    store_dir: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_seconds: float  # how often it refreshes heartbeat_at
    heartbeat_age: float  # seconds since heartbeat_at (the database's clock), when read
    released: bool  # it stopped gracefully

    def summary(self) -> dict[str, str | int | None]:
        """For /healthz: the active instance (host, pid, since, store)."""
        return {
            "host": self.host,
            "pid": self.pid,
            "since": self.started_at.isoformat(),
            "heartbeat_at": self.heartbeat_at.isoformat(),
            "store_id": str(self.store_id),
            "store_dir": self.store_dir,
        }


@dataclass(frozen=True)
class Decision:
    role: Role
    claim: bool = False  # ACTIVE: record this instance's store as the deployment's
    reason: str | None = None  # REFUSED: why, and what to do; STANDBY: why it cannot take over


def decide(
    *,
    lock_taken: bool,
    own_store: uuid.UUID,
    record: ActiveInstance | None,
    protects: bool,
) -> Decision:
    """This instance's role. `lock_taken`: it holds the deployment's lock now; `record`: the
    deployment's record (None: none yet); `protects`: the deployment has a protected item or
    a recovery point (in the recorded store)."""
    same_store = record is None or record.store_id == own_store
    if not lock_taken:
        # another instance is active; say now if this one could never take over from it
        if same_store or not protects:
            return Decision(Role.STANDBY)
        return Decision(Role.STANDBY, reason=other_store_reason(own_store, record))
    if same_store:
        return Decision(Role.ACTIVE, claim=record is None)
    if not protects:
        return Decision(Role.ACTIVE, claim=True)  # the recorded store holds nothing needed
    return Decision(Role.REFUSED, reason=other_store_reason(own_store, record))


MISSED_HEARTBEATS = 2


def takeover_wait(record: ActiveInstance | None, *, gone: bool = False) -> float:
    """Seconds the new holder of the lock waits before it takes over from `record`'s
    instance: none after a graceful stop, or when that one is known to be `gone` (it ran on
    this host and its process ended: a restart after a crash), else until it missed two
    heartbeats."""
    if record is None or record.released or gone:
        return 0.0
    return max(0.0, MISSED_HEARTBEATS * record.heartbeat_seconds - record.heartbeat_age)


def other_store_reason(own_store: uuid.UUID, record: ActiveInstance | None) -> str:
    assert record is not None
    return (
        f"another replica store (id {record.store_id}, at {record.store_dir} on {record.host}) "
        f"holds this deployment's recovery points, and this instance's store (id {own_store}) "
        "does not: this instance cannot take over. Run it with DR_REPLICATION_STORE_DIR "
        "pointing at that store (the same folder, or the same volume mounted here), or stop it"
    )

"""An item's failover state as an aggregate (beside the replication service's item state): what
this service did to the item (tested, failed over, committed, reversed). Its methods check the
rule, change the state and record the events (`ItemFailedOver`, `ItemFailoverCommitted`); its
repository (services/failover/item_failover_repository.py) writes the row and the events
(outbox) in one transaction. Pure: no I/O.

protected -> testing -> (cleanup) the state before the test
protected -> failover_in_progress -> failed_over | failover_failed
failed_over -> committed; failed_over | committed -> reverse_replicating"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from services.failover.domain.errors import FailoverRefused
from services.failover.domain.items import ItemFailoverState as State
from shared.schemas.agent import NicAttachment
from shared.schemas.envelope import EventPayload
from shared.schemas.failover import (
    FailoverKind,
    ItemFailedOver,
    ItemFailoverCommitted,
    MaterialisedDisk,
)


class FailoverInfo(BaseModel):
    """What the last failover of the item did; only the fields a step set are stored."""

    model_config = ConfigDict(extra="forbid")

    nics: list[NicAttachment] | None = None
    kind: FailoverKind | None = None
    cycle_seq: int | None = None
    source_time: str | None = None
    app_consistent: bool | None = None
    failed_over_at: str | None = None
    data_loss_seconds: float | None = None
    recovery_vm_name: str | None = None
    recovery_agent_id: str | None = None
    recovery_site: str | None = None
    source_site: str | None = None
    source_disks: dict[str, str] | None = None
    recovery_disks: list[MaterialisedDisk] | None = None
    job_id: str | None = None
    committed_at: str | None = None
    reversed_by: str | None = None
    seeded: bool | None = None


class TestFailover(BaseModel):
    """The running test failover of the item: its VM, where, and the state to go back to."""

    __test__ = False  # not a pytest test class

    model_config = ConfigDict(extra="forbid")

    job_id: str
    vm_name: str
    agent_id: str
    network_id: str | None = None
    network_created: bool = False
    started_at: str
    previous_state: str = State.PROTECTED.value


class CleanupNote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at: str
    job_id: str
    test_job_id: str
    notes: str = ""


@dataclass
class ItemFailover:
    item_id: uuid.UUID
    vault_id: uuid.UUID
    state: State = State.PROTECTED
    info: FailoverInfo = field(default_factory=FailoverInfo)
    test: TestFailover | None = None
    notes: list[CleanupNote] = field(default_factory=list)
    events: list[EventPayload] = field(default_factory=list, repr=False, compare=False)

    # ------------------------------------------------------------ test failover

    def begin_test(
        self,
        job_id: uuid.UUID,
        vm_name: str,
        agent_id: str,
        *,
        network_id: str | None,
        network_created: bool,
        now: datetime,
    ) -> None:
        """A test failover starts (or resumes: its start time and the state to go back to
        stay those of the first run)."""
        resumed = self.state is State.TESTING and self.test is not None
        self.test = TestFailover(
            job_id=str(job_id),
            vm_name=vm_name,
            agent_id=agent_id,
            network_id=network_id,
            network_created=network_created,
            started_at=self.test.started_at if resumed and self.test else now.isoformat(),
            previous_state=self.test.previous_state if resumed and self.test else self.state.value,
        )
        self.state = State.TESTING

    def end_test(self, note: CleanupNote) -> None:
        """The test VM is gone: back to the state before the test, with the operator's notes."""
        previous = self.test.previous_state if self.test else State.PROTECTED.value
        self.state = State(previous)
        self.test = None
        self.notes.append(note)

    # ------------------------------------------------------------ failover

    def placing(self, nics: list[NicAttachment]) -> None:
        """A (planned, unplanned) failover placed the recovery VM's NICs."""
        self.state = State.FAILOVER_IN_PROGRESS
        self.info.nics = nics

    def failover_failed(self) -> None:
        self.state = State.FAILOVER_FAILED

    def failed_over(self, info: FailoverInfo, recovery_vm_name: str) -> None:
        assert info.kind is not None and info.cycle_seq is not None
        assert info.recovery_agent_id is not None
        self.state = State.FAILED_OVER
        for name, value in info:
            if value is not None:
                setattr(self.info, name, value)
        self.events.append(
            ItemFailedOver(
                item_id=self.item_id,
                kind=info.kind,
                cycle_seq=info.cycle_seq,
                recovery_vm_name=recovery_vm_name,
                recovery_agent_id=uuid.UUID(info.recovery_agent_id),
            )
        )

    def commit(self, name: str, now: datetime) -> int:
        """Commit the failover (only its point is kept); returns the point's cycle."""
        if self.state not in (State.FAILED_OVER, State.COMMITTED) or self.info.cycle_seq is None:
            raise FailoverRefused(f"{name} is not failed over")
        self.state = State.COMMITTED
        self.info.committed_at = now.isoformat()
        self.events.append(
            ItemFailoverCommitted(item_id=self.item_id, cycle_seq=self.info.cycle_seq)
        )
        return self.info.cycle_seq

    def check_reversible(self, name: str) -> None:
        if self.state not in (State.FAILED_OVER, State.COMMITTED, State.REVERSE_REPLICATING):
            raise FailoverRefused(f"{name} is not failed over")

    def protected(self) -> None:
        """A new item (reverse replication) protects the VM now."""
        self.state = State.PROTECTED

    def reversing(self, new_item_id: uuid.UUID, seeded: bool) -> None:
        self.state = State.REVERSE_REPLICATING
        self.info.reversed_by = str(new_item_id)
        self.info.seeded = seeded


def stored_info(info: FailoverInfo) -> dict[str, object]:
    """The info as stored: the fields a step set (None fields left out, at the top level
    only: a NIC's or disk's None values stay, as the agent and the API show them)."""
    return {k: v for k, v in info.model_dump(mode="json").items() if v is not None}

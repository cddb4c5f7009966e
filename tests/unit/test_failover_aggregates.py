"""The failover job and an item's failover state as aggregates: their rules, state changes and
recorded events, without a database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from services.failover.domain.errors import FailoverRefused
from services.failover.domain.items import ItemFailoverState
from services.failover.domain.jobs import Operation
from services.failover.domain.plans import PlanGroup
from services.failover.item_failover import CleanupNote, FailoverInfo, ItemFailover
from services.failover.job import ItemResult, Job, JobParams, JobResult, WaitingFor
from shared.schemas.agent import NicAttachment
from shared.schemas.failover import (
    FailoverKind,
    ItemFailedOver,
    ItemFailoverCommitted,
    JobChanged,
    JobState,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def new_job(operation: Operation = Operation.PLANNED_FAILOVER) -> Job:
    return Job.create(
        uuid.uuid4(),
        operation,
        target_kind="item",
        target=str(uuid.uuid4()),
        params=JobParams(items=["i1"]),
        expected_tasks=4,
        created_by="tok_1",
    )


def test_a_new_job_records_its_creation() -> None:
    job = new_job()
    assert job.state is JobState.NOT_STARTED and job.kind == "item:planned_failover"
    assert job.new_history == ["planned_failover created by tok_1"]
    assert [type(e) for e in job.events] == [JobChanged]


def test_a_job_starts_once_and_counts_its_progress() -> None:
    job = new_job()
    job.start(NOW)
    assert job.state is JobState.IN_PROGRESS and job.started_at == NOW
    with pytest.raises(FailoverRefused, match="started already"):
        job.start(NOW)
    job.tasks_done(2)
    assert job.progress == 50
    job.tasks_done(9)
    assert job.progress == 99  # 100 only when it finishes
    last = job.events[-1]
    assert isinstance(last, JobChanged) and last.progress == 99


def test_approval_needs_the_action_the_job_waits_for() -> None:
    job = new_job()
    with pytest.raises(FailoverRefused, match="not waiting for input"):
        job.approve("a1", "op")
    job.start(NOW)
    job.wait_for(WaitingFor(action_id="a1", action_key="group1:pre:a1", name="Check DNS"))
    assert job.state is JobState.WAITING_FOR_INPUT
    with pytest.raises(FailoverRefused, match="waits for action 'a1', not 'a2'"):
        job.approve("a2", "op")
    assert job.approve("a1", "op") == "group1:pre:a1"
    assert job.new_history[-1] == "manual action 'Check DNS' approved by op"
    job.input_given()
    assert job.state is JobState.IN_PROGRESS and job.waiting_for is None


def test_only_a_failed_restartable_job_restarts_with_a_new_run() -> None:
    job = new_job()
    job.start(NOW)
    with pytest.raises(FailoverRefused, match="only a failed job"):
        job.restart("op", items_busy=False)
    job.finish(NOW, failure=("disk full", "the host", "free space"), errors=0, result=JobResult())
    assert job.state is JobState.FAILED and job.error == "disk full"
    with pytest.raises(FailoverRefused, match="another job holds"):
        job.restart("op", items_busy=True)
    job.restart("op", items_busy=False)
    assert (job.state, job.run_no, job.restarts) == (JobState.IN_PROGRESS, 2, 1)
    assert job.error is None and job.cause is None and job.drop_unfinished_tasks
    assert job.new_history[-1] == "restarted by op"

    unplanned = new_job(Operation.UNPLANNED_FAILOVER)
    unplanned.start(NOW)
    unplanned.finish(NOW, failure=("x", "", ""), errors=0, result=JobResult())
    with pytest.raises(FailoverRefused, match="can't be restarted"):
        unplanned.restart("op", items_busy=False)


def test_a_run_past_errors_completes_with_errors() -> None:
    job = new_job(Operation.UNPLANNED_FAILOVER)
    job.start(NOW)
    job.finish(NOW, failure=None, errors=2, result=JobResult(items={}))
    assert job.state is JobState.COMPLETED_WITH_ERRORS and job.progress == 100
    assert job.error == "2 error(s); see the failed tasks"
    assert job.new_history[-1] == "finished: completed_with_errors"


def test_a_resumed_job_counts_the_restart() -> None:
    job = new_job()
    job.start(NOW)
    job.resumed("1 steps done; resuming at the next step")
    assert job.restarts == 1
    assert job.new_history[-1].startswith("service restarted: job resumed (1 steps done")


def test_a_test_failover_remembers_where_it_came_from() -> None:
    item = ItemFailover(item_id=uuid.uuid4(), vault_id=uuid.uuid4())
    job_id = uuid.uuid4()
    item.begin_test(job_id, "web-test", "agent", network_id=None, network_created=False, now=NOW)
    assert item.state is ItemFailoverState.TESTING and item.test is not None
    later = datetime(2026, 2, 1, tzinfo=UTC)
    item.begin_test(job_id, "web-test", "agent", network_id=None, network_created=False, now=later)
    assert item.test.started_at == NOW.isoformat()  # a resumed test keeps its start
    assert item.test.previous_state == "protected"
    item.end_test(CleanupNote(at=later.isoformat(), job_id="c", test_job_id=str(job_id)))
    assert item.state is ItemFailoverState.PROTECTED and item.test is None
    assert item.notes[-1].test_job_id == str(job_id)


def test_failover_commit_and_reverse_follow_each_other() -> None:
    item = ItemFailover(item_id=uuid.uuid4(), vault_id=uuid.uuid4())
    with pytest.raises(FailoverRefused, match="web01 is not failed over"):
        item.commit("web01", NOW)
    with pytest.raises(FailoverRefused, match="not failed over"):
        item.check_reversible("web01")
    item.placing([NicAttachment(nic_id="n0", network_id=None)])
    assert item.state is ItemFailoverState.FAILOVER_IN_PROGRESS
    agent = uuid.uuid4()
    item.failed_over(
        FailoverInfo(kind=FailoverKind.PLANNED, cycle_seq=12, recovery_agent_id=str(agent)),
        "web01",
    )
    assert item.state is ItemFailoverState.FAILED_OVER
    assert item.info.nics == [NicAttachment(nic_id="n0", network_id=None)]  # the placement stays
    event = item.events[-1]
    assert isinstance(event, ItemFailedOver) and event.recovery_agent_id == agent
    assert item.commit("web01", NOW) == 12
    assert isinstance(item.events[-1], ItemFailoverCommitted)
    item.check_reversible("web01")
    new_item = uuid.uuid4()
    item.reversing(new_item, seeded=True)
    assert item.state is ItemFailoverState.REVERSE_REPLICATING
    assert item.info.reversed_by == str(new_item) and item.info.seeded


def test_results_and_params_are_stored_as_the_fields_set() -> None:
    """The job row keeps the shape the API shows: only the fields an operation set (a None it
    set stays), a plan's groups whole."""
    failed = ItemResult(vm_name="web", state="failed", error="boom")
    later = failed.model_copy(update={"errors": ["boom"], "test_network_id": None})
    result = JobResult(groups=2, items={"i1": later})
    assert result.stored() == {
        "groups": 2,
        "items": {
            "i1": {
                "vm_name": "web",
                "state": "failed",
                "error": "boom",
                "errors": ["boom"],
                "test_network_id": None,
            }
        },
    }
    assert JobResult.model_validate(result.stored()).stored() == result.stored()
    assert JobResult().stored() == {}
    params = JobParams(items=["i1"])
    params.groups = [PlanGroup(items=[uuid.UUID(int=1)])]
    stored = params.stored()
    assert stored == {
        "items": ["i1"],
        "groups": [{"items": [str(uuid.UUID(int=1))], "pre_actions": [], "post_actions": []}],
    }
    assert JobParams.model_validate(stored).stored() == stored

"""Failover rules: durable-step decisions, job states, refusals, plan limits, action
filtering, script failures, zero-data-loss proof, NIC placement through the shared rules."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from services.failover.domain.errors import FailoverRefused, InvalidRequest, NotFound
from services.failover.domain.items import (
    ItemFailoverState,
    check_cleanup,
    check_commit,
    check_planned,
    check_reverse,
    check_test,
    check_unplanned,
    seed_disks,
)
from services.failover.domain.jobs import (
    Operation,
    StepAction,
    can_restart,
    command_id_for,
    final_state,
    is_finished,
    progress,
    resume_point,
    step_action,
)
from services.failover.domain.nics import NetworkMapping, failover_nics
from services.failover.domain.plans import PlanAction, PlanGroup, actions_for, plan_problems
from services.failover.domain.points import (
    PointNotRetained,
    RetainedPoints,
    check_point_exists,
    data_loss_seconds,
    point_request,
    zero_data_loss,
)
from services.failover.domain.scripts import (
    environment_secrets,
    excerpt,
    script_actions,
    script_env,
    script_failure,
)
from services.failover.scripts_folder import script_file
from shared.schemas.failover import FailoverKind, JobState, MaterialisedDisk, PointChoice
from shared.schemas.inventory import IpMode, Nic, StaticPool, Subnet, VmNetwork
from tests.support.failover_rows import item_row, task_row

ITEM = item_row(latest_seq=4)


def test_step_actions_resume_at_the_last_completed_step() -> None:
    assert step_action(None, False) is StepAction.RUN
    assert step_action("succeeded", False) is StepAction.SKIP
    assert step_action("in_progress", False) is StepAction.RESEND
    assert step_action("in_progress", True) is StepAction.WAIT
    assert step_action("failed", False) is StepAction.FAILED


def test_command_ids_are_stable_within_a_run_and_new_after_a_restart() -> None:
    job = uuid.uuid4()
    first = command_id_for(job, "item:create_vm", 1)
    assert first == command_id_for(job, "item:create_vm", 1)
    assert first != command_id_for(job, "item:create_vm", 2)
    assert first != command_id_for(job, "item:materialise", 1)
    assert first != command_id_for(uuid.uuid4(), "item:create_vm", 1)


def test_resume_point_names_the_open_steps() -> None:
    tasks = [
        task_row(name="prepare", state="succeeded"),
        task_row(name="web01: materialise", state="in_progress"),
    ]
    assert resume_point(tasks) == "1 steps done; resuming web01: materialise"


def test_job_state_rules() -> None:
    op = Operation.UNPLANNED_FAILOVER
    assert final_state(op, failed=False, errors=0) is JobState.SUCCEEDED
    assert final_state(op, failed=False, errors=2) is JobState.COMPLETED_WITH_ERRORS
    assert final_state(op, failed=True, errors=0) is JobState.FAILED
    assert can_restart(Operation.PLANNED_FAILOVER, JobState.FAILED) is None
    assert "only a failed job" in str(can_restart(Operation.COMMIT, JobState.SUCCEEDED))
    assert "can't be restarted" in str(can_restart(op, JobState.FAILED))
    assert not is_finished(JobState.WAITING_FOR_INPUT)
    assert progress(3, 6) == 50 and progress(9, 6) == 99


def test_refusals() -> None:
    testing = SimpleNamespace(state=ItemFailoverState.TESTING, test={"job_id": "j"})
    with pytest.raises(FailoverRefused, match="already running"):
        check_test(ITEM, testing)
    with pytest.raises(FailoverRefused, match="initial replication"):
        check_planned(item_row(state="initial_replication_in_progress"), None)
    with pytest.raises(FailoverRefused, match="not failed over"):
        check_commit(ITEM, None)
    with pytest.raises(FailoverRefused, match="no test failover"):
        check_cleanup(ITEM, None)
    failed_over = SimpleNamespace(state=ItemFailoverState.FAILED_OVER, test=None)
    with pytest.raises(FailoverRefused, match="already failed over"):
        check_unplanned(ITEM, failed_over)
    check_commit(ITEM, failed_over)
    check_reverse(ITEM, failed_over)
    with pytest.raises(FailoverRefused) as exc:
        point_request(PointChoice.CHOSEN, None)
    assert isinstance(exc.value, InvalidRequest)


def test_seed_disks_need_the_old_primary_or_force() -> None:
    disks = [
        MaterialisedDisk(disk_id="d0", path="/r/web01/d0.vhdx", size_bytes=1, merkle_root="00")
    ]
    old = {"d0": "/p/web01/d0.vhdx"}
    assert seed_disks(disks, old, {"/p/web01/d0.vhdx"}, False) == [
        {"disk_id": "d0", "path": "/p/web01/d0.vhdx"}
    ]
    with pytest.raises(FailoverRefused, match="old primary unreachable: pass force_full_resync"):
        seed_disks(disks, old, set(), False)
    assert seed_disks(disks, old, set(), True) == []


def test_plan_limits() -> None:
    items = [uuid.uuid4() for _ in range(101)]
    problems = plan_problems([PlanGroup(items=items)])
    assert any("at most 100 protected items; this one has 101" in p for p in problems)
    problems = plan_problems([PlanGroup() for _ in range(8)])
    assert any("at most 7 groups; this one has 8" in p for p in problems)
    ok = [PlanGroup(items=items[:15]) for _ in range(1)] + [PlanGroup(items=items[15:100])]
    assert plan_problems(ok) == []
    dup = [PlanGroup(items=[items[0]]), PlanGroup(items=[items[0]])]
    assert any("only one group" in p for p in plan_problems(dup))
    bad = PlanGroup(pre_actions=[PlanAction(name="x", kind="script")])
    assert any("needs a script" in p for p in plan_problems([bad]))


def test_actions_are_filtered_by_run_kind() -> None:
    both = PlanAction(action_id="a", name="a", kind="manual")
    test_only = PlanAction(action_id="t", name="t", kind="manual", run_on=[FailoverKind.TEST])
    actions = [both, test_only]
    assert [a.action_id for a in actions_for(actions, FailoverKind.TEST)] == ["a", "t"]
    assert [a.action_id for a in actions_for(actions, FailoverKind.PLANNED)] == ["a"]
    assert actions_for(actions, None) == []


def test_script_failures() -> None:
    assert script_failure(0, "", False, 600) == ""
    assert script_failure(None, "", True, 600) == "timed out after 600 s"
    assert "exited with status 3" in script_failure(3, "", False, 600)
    assert script_failure(0, "warn\n", False, 600) == "wrote to stderr: warn"


def test_a_script_is_a_name_from_the_scripts_folder(tmp_path: Path) -> None:
    folder = tmp_path / "scripts"
    folder.mkdir()
    ok = folder / "drain.sh"
    ok.write_text("#!/bin/sh\n")
    ok.chmod(0o755)
    assert script_file(folder, "drain.sh") == ok.resolve()
    plain = folder / "plain.sh"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="not executable"):
        script_file(folder, "plain.sh")
    outside = tmp_path / "evil.sh"
    outside.write_text("#!/bin/sh\n")
    outside.chmod(0o755)
    (folder / "link.sh").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the scripts folder"):
        script_file(folder, "link.sh")
    (folder / "sub").mkdir()
    with pytest.raises(ValueError, match="not a file"):
        script_file(folder, "sub")
    with pytest.raises(ValueError, match="not a file"):
        script_file(folder, "missing.sh")
    for bad in ("../evil.sh", "/bin/sh", "..", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="not a script name"):
            script_file(folder, bad)
        with pytest.raises(ValidationError):
            PlanAction(name="x", kind="script", script=bad)
    with pytest.raises(ValidationError):
        PlanAction.model_validate({"name": "x", "kind": "script", "path": "/bin/sh"})


def test_script_environment_and_excerpt_hold_no_secret() -> None:
    env = script_env("/usr/bin:/bin", {"job_id": "j1", "operation": "test_failover"})
    assert env == {
        "PATH": "/usr/bin:/bin",
        "DR_PLAN_JOB_ID": "j1",
        "DR_PLAN_OPERATION": "test_failover",
    }
    environ = {
        "DR_ADMIN_TOKEN": "adm_not-a-real-token-0123",
        "DATABASE_URL": "postgresql://dr:hunter22@db/dr",
        "DR_LOG_LEVEL": "INFO",
    }
    secrets = environment_secrets(environ)
    assert sorted(secrets) == sorted([environ["DR_ADMIN_TOKEN"], environ["DATABASE_URL"]])
    out = (
        b"token adm_not-a-real-token-0123 and db postgresql://dr:hunter22@db/dr\n"
        b"Authorization: Bearer abc.def password=swordfish drt_AAAAAAAAAAAAAAAAAAAA ok\n"
    )
    text = excerpt(out, 10_000, secrets)
    for secret in ("adm_not", "hunter22", "abc.def", "swordfish", "drt_AAAA"):
        assert secret not in text, text
    assert text.endswith("ok\n") and "[redacted]" in text
    assert excerpt(b"x" * 50, 10, []) == "[...]" + "x" * 10


def test_only_script_actions_count_as_script_changes() -> None:
    script = {"action_id": "s", "name": "s", "kind": "script", "script": "a.sh"}
    manual = {"action_id": "m", "name": "m", "kind": "manual"}
    before = [PlanGroup.model_validate({"post_actions": [script, manual]})]
    renamed = [
        PlanGroup.model_validate(
            {"items": [str(uuid.uuid4())], "post_actions": [{**script, "name": "t"}]}
        )
    ]
    changed = [PlanGroup.model_validate({"post_actions": [{**script, "args": ["-x"]}]})]
    moved = [PlanGroup.model_validate({"pre_actions": [script]})]
    reloaded = [PlanGroup.model_validate(g.model_dump(mode="json")) for g in before]
    assert script_actions(renamed) == script_actions(reloaded)
    assert script_actions(changed) != script_actions(before)
    assert script_actions(moved) != script_actions(before)


def test_zero_data_loss_proof() -> None:
    roots = {"d0": "a" * 64, "d1": "b" * 64}
    assert zero_data_loss(roots, roots) == (True, "")
    ok, why = zero_data_loss({"d0": "a" * 64, "d1": "c" * 64}, roots)
    assert not ok and "d1" in why
    assert not zero_data_loss(roots, {})[0]


def test_data_loss_window() -> None:
    now = datetime.now(UTC)
    assert data_loss_seconds(now, now - timedelta(seconds=42)) == 42


def network(network_id: str, start: str, end: str) -> VmNetwork:
    pool = StaticPool(start=start, end=end)
    return VmNetwork(
        network_id=network_id,
        name=network_id,
        subnets=[Subnet(name="corp", cidr="10.0.0.0/8", static_pool=pool)],
    )


def test_nics_follow_the_mapping_and_the_ip_rules() -> None:
    nics = [
        Nic(
            nic_id="n0", network_id="p", subnet="corp", ip_mode=IpMode.STATIC, ip_address="10.2.0.5"
        ),
        Nic(nic_id="n1", network_id="unmapped"),
    ]
    nets = {"r": network("r", "10.2.0.5", "10.2.0.9"), "p": network("p", "10.1.0.5", "10.1.0.9")}
    mappings = [NetworkMapping(source_network_id="p", target_network_id="r")]
    placed = failover_nics(nics, mappings, nets, set())
    assert placed[0].network_id == "r" and placed[0].ip_address == "10.2.0.5"
    assert placed[1].network_id is None
    taken = failover_nics(nics, mappings, nets, {"10.2.0.5"})
    assert taken[0].ip_address == "10.2.0.6"
    # failback: the mapping works backwards
    back = [
        Nic(
            nic_id="n0", network_id="r", subnet="corp", ip_mode=IpMode.STATIC, ip_address="10.2.0.5"
        )
    ]
    assert failover_nics(back, mappings, nets, set())[0].network_id == "p"
    # test failover: every NIC on the test network, or none
    test_net = network("t", "10.9.0.1", "10.9.0.9")
    on_test = failover_nics(nics, mappings, nets, set(), test_net, test=True)
    assert [n.network_id for n in on_test] == ["t", "t"]
    assert [n.network_id for n in failover_nics(nics, [], {}, set(), None, test=True)] == [
        None,
        None,
    ]


def test_a_point_is_checked_when_the_job_is_asked_for() -> None:
    item = item_row(vm_name="db01", latest_seq=40, latest_app_seq=None)
    check_point_exists(item, "chosen", 40)
    check_point_exists(item, "latest", None)
    with pytest.raises(FailoverRefused) as missing:
        check_point_exists(item, "chosen", 2**62)
    assert isinstance(missing.value, NotFound) and "latest is 40" in missing.value.message
    with pytest.raises(FailoverRefused) as no_app:
        check_point_exists(item, "latest_app_consistent", None)
    assert type(no_app.value) is FailoverRefused  # a conflict, not a missing point


def test_a_chosen_point_must_still_be_retained() -> None:
    item = item_row(vm_name="db01", latest_seq=40, latest_app_seq=12)
    kept = RetainedPoints(seqs=frozenset({30, 35, 40}), app_seqs=frozenset())
    assert kept.describe() == "30..40 (3 points)"
    check_point_exists(item, "chosen", 35, kept)
    with pytest.raises(PointNotRetained, match=r"point 12: the retained points are 30\.\.40"):
        check_point_exists(item, "chosen", 12, kept)
    with pytest.raises(FailoverRefused, match="no app-consistent"):
        check_point_exists(item, "latest_app_consistent", None, kept)
    # points taken before they were listed: only the latest bounds the choice
    check_point_exists(item, "chosen", 12, RetainedPoints())

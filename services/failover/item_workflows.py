"""The item workflows: one function per operation on one protected item, sequencing the
activities of services/failover/steps.py; `run_items` runs one operation on several items in
parallel (a one-item job, or a group of a recovery plan)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from services.failover import item_failover_repository as failover_repo
from services.failover import read_model_repository as read_models
from services.failover import repository as repo
from services.failover.domain.errors import FailoverRefused
from services.failover.domain.items import seed_disks
from services.failover.domain.jobs import NAMESPACE, Operation
from services.failover.domain.points import zero_data_loss
from services.failover.item_failover import CleanupNote
from services.failover.job import ItemResult, JobResult
from services.failover.steps import (
    ItemFacts,
    TestNetwork,
    create_vm,
    delete_vm,
    disk_images,
    mark_failed_over,
    materialise,
    prepare,
    remove_old_vm,
    shutdown,
    synced,
    vm_name_of,
)
from services.failover.test_networks import delete_test_networks, test_network
from services.failover.workflow import Run, StepFailed, StepResult, Workflow
from shared.schemas.agent import NicAttachment
from shared.schemas.failover import (
    FailoverKind,
    PointChoice,
    ReverseDisk,
    ReverseReplicationRequested,
    SeedDisk,
)


class Proof(StepResult):
    """Planned failover: the replica's roots equal the source's final roots."""

    proven: bool
    roots: dict[str, str]
    final_cycle_seq: int | None


class Committed(StepResult):
    cycle_seq: int


class ReversePlan(StepResult):
    """Reverse replication of a failed-over item: the new item, its disks and the old
    primary's disks that seed it."""

    # the VM, protected again under a new item
    new_item_id: uuid.UUID
    vm_id: str
    vm_name: str
    nics: list[NicAttachment]
    # the recovery host becomes the source; the old primary site the target
    source_agent_id: uuid.UUID
    source_site: str
    target_site: str
    disks: list[ReverseDisk]
    seed_disks: list[SeedDisk]


class Reversed(StepResult):
    new_item_id: uuid.UUID
    seeded: bool


class ReverseProtected(StepResult):
    new_item_id: uuid.UUID
    state: str | None


STEPS = {
    Operation.TEST_FAILOVER: 3,
    Operation.TEST_CLEANUP: 2,
    Operation.PLANNED_FAILOVER: 7,
    Operation.UNPLANNED_FAILOVER: 6,
    Operation.COMMIT: 1,
    Operation.REVERSE: 4,
    Operation.FAILBACK: 12,
}


def _failure_result(
    facts: ItemFacts | None, item_id: uuid.UUID, exc: StepFailed, errors: list[str] | None = None
) -> ItemResult:
    result = ItemResult(
        vm_name=facts.vm_name if facts else str(item_id), state="failed", error=exc.error
    )
    return result if errors is None else result.model_copy(update={"errors": errors})


async def test_item(run: Run, item_id: uuid.UUID, test_net: TestNetwork) -> None:
    params = run.job.params
    p = f"{item_id}:"
    facts = await prepare(run, p, item_id, test_net)
    test_name = f"{facts.vm_name}-test"
    item = await failover_repo.item_failover(run.pool, item_id, run.vault_id)
    item.begin_test(
        run.job_id,
        test_name,
        str(facts.recovery_agent_id),
        network_id=test_net.network_id,
        network_created=test_net.created,
        now=datetime.now(UTC),
    )
    await failover_repo.save_item_failover(run.pool, item)
    point = await materialise(
        run,
        p,
        facts,
        test_name,
        PointChoice(params.choice or "latest"),
        params.cycle_seq,
        differencing=True,
    )
    vm = await create_vm(run, p, facts, f"{facts.vm_id}-test", test_name, point, facts.placed_nics)
    run.item_results[str(item_id)] = ItemResult(
        vm_name=facts.vm_name,
        state="testing",
        test_vm=vm.vm_name,
        cycle_seq=point.cycle_seq,
        source_time=point.source_time,
        test_network_id=test_net.network_id,
    )


async def cleanup_item(run: Run, item_id: uuid.UUID) -> None:
    p = f"{item_id}:"
    test = (await failover_repo.item_failover(run.pool, item_id, run.vault_id)).test
    name = await vm_name_of(run, item_id)
    if test is None:
        run.item_results[str(item_id)] = ItemResult(vm_name=name, state="no test to clean up")
        return
    await delete_vm(
        run,
        f"{p}delete_vm",
        f"{name}: delete test VM {test.vm_name}",
        uuid.UUID(test.agent_id),
        test.vm_name,
        f"deleting test VM {test.vm_name}",
        crash="delete_vm",
    )

    async def record(_cid: uuid.UUID) -> CleanupNote:
        note = CleanupNote(
            at=datetime.now(UTC).isoformat(),
            job_id=str(run.job_id),
            test_job_id=test.job_id,
            notes=run.job.params.notes or "",
        )
        item = await failover_repo.item_failover(run.pool, item_id, run.vault_id)
        item.end_test(note)
        await failover_repo.save_item_failover(run.pool, item)
        return note

    await run.step(f"{p}notes", f"{name}: record cleanup notes", CleanupNote, record, crash="notes")
    run.item_results[str(item_id)] = ItemResult(vm_name=name, state="cleaned up")


async def _failover_failed(run: Run, item_id: uuid.UUID) -> None:
    item = await failover_repo.item_failover(run.pool, item_id, run.vault_id)
    item.failover_failed()
    await failover_repo.save_item_failover(run.pool, item)


async def planned_item(
    run: Run, item_id: uuid.UUID, kind: FailoverKind = FailoverKind.PLANNED
) -> None:
    p = f"{item_id}:"
    facts = await prepare(run, p, item_id, None)
    try:
        final = await shutdown(run, p, facts)
        await synced(run, p, facts, final.cycle_seq, run.settings.step_timeout_seconds)
        await remove_old_vm(run, p, facts)
        point = await materialise(
            run, p, facts, facts.vm_name, PointChoice.LATEST, None, handover=True
        )

        async def prove(_cid: uuid.UUID) -> Proof:
            roots = {d.disk_id: d.merkle_root for d in point.disks}
            ok, why = zero_data_loss(roots, final.roots)
            if not ok:
                raise StepFailed(
                    f"zero data loss not proven for {facts.vm_name}: {why}",
                    cause="the replica differs from the source's final state",
                    recommendation="do not use this copy; resync the item and re-run the "
                    "planned failover",
                )
            return Proof(proven=True, roots=roots, final_cycle_seq=final.cycle_seq)

        proof = await run.step(
            f"{p}prove",
            f"{facts.vm_name}: prove zero data loss (Merkle roots)",
            Proof,
            prove,
            crash="prove",
        )
        vm = await create_vm(run, p, facts, facts.vm_id, facts.vm_name, point, facts.placed_nics)
        info = await mark_failed_over(run, p, facts, kind, point, vm)
    except StepFailed:
        await _failover_failed(run, item_id)
        raise
    run.item_results[str(item_id)] = ItemResult(
        vm_name=facts.vm_name,
        state="failed_over",
        cycle_seq=point.cycle_seq,
        zero_data_loss=proof.proven,
        data_loss_seconds=0.0,
        recovery_vm=vm.vm_name,
        failed_over_at=info.failed_over_at,
    )


async def unplanned_item(run: Run, item_id: uuid.UUID) -> None:
    params = run.job.params
    p = f"{item_id}:"
    facts = await prepare(run, p, item_id, None)
    errors: list[str] = []
    if params.shutdown_source:
        try:
            final = await shutdown(run, p, facts, timeout=run.settings.sync_timeout_seconds)
            await synced(run, p, facts, final.cycle_seq, run.settings.sync_timeout_seconds)
        except StepFailed as exc:
            run.errors += 1
            errors.append(exc.error)
    try:
        point = await materialise(
            run,
            p,
            facts,
            facts.vm_name,
            PointChoice(params.choice or "latest"),
            params.cycle_seq,
            handover=True,
        )
        vm = await create_vm(run, p, facts, facts.vm_id, facts.vm_name, point, facts.placed_nics)
        info = await mark_failed_over(run, p, facts, FailoverKind.UNPLANNED, point, vm)
    except StepFailed as exc:
        run.errors += 1
        await _failover_failed(run, item_id)
        run.item_results[str(item_id)] = _failure_result(facts, item_id, exc, [*errors, exc.error])
        return
    run.item_results[str(item_id)] = ItemResult(
        vm_name=facts.vm_name,
        state="failed_over",
        cycle_seq=point.cycle_seq,
        source_time=point.source_time,
        failed_over_at=info.failed_over_at,
        data_loss_seconds=info.data_loss_seconds,
        recovery_vm=vm.vm_name,
        errors=errors,
    )


async def commit_item(run: Run, item_id: uuid.UUID) -> None:
    p = f"{item_id}:"
    name = await vm_name_of(run, item_id)

    async def effect(_cid: uuid.UUID) -> Committed:
        async with run.pool.acquire() as conn, conn.transaction():
            item = await failover_repo.item_failover(conn, item_id, run.vault_id)
            try:
                seq = item.commit(name, datetime.now(UTC))
            except FailoverRefused as exc:
                raise StepFailed(exc.message, "commit comes after a failover") from None
            await failover_repo.save_item_failover(conn, item)
        return Committed(cycle_seq=seq)

    done = await run.step(
        f"{p}commit",
        f"{name}: commit the failover (keep point only)",
        Committed,
        effect,
        crash="commit",
    )
    run.item_results[str(item_id)] = ItemResult(
        vm_name=name, state="committed", cycle_seq=done.cycle_seq
    )


async def old_primary_images(run: Run, p: str, item_id: uuid.UUID, name: str) -> set[str]:
    """The old primary's disk images (of the failed-over item's disks) that its host, the
    item's source agent, says it still has. Nothing is asked of an item that cannot be
    reversed (the plan refuses it)."""
    view = await failover_repo.item_failover(run.pool, item_id, run.vault_id)
    item = await read_models.item(run.pool, item_id)
    try:
        view.check_reversible(name)
    except FailoverRefused:
        return set()
    old_disks = view.info.source_disks or {}
    wanted = {old_disks.get(d.disk_id, "") for d in view.info.recovery_disks or []} - {""}
    if item is None or not wanted:
        return set()
    found = await disk_images(
        run,
        f"{p}old_disks",
        f"{name}: ask the old primary's host for its disk images",
        item.source_agent_id,
        sorted(wanted),
        crash="old_disks",
    )
    return found.present()


async def reverse_item(run: Run, item_id: uuid.UUID) -> uuid.UUID:
    p = f"{item_id}:"
    name = await vm_name_of(run, item_id)
    force = bool(run.job.params.force_full_resync)
    new_item_id = uuid.uuid5(NAMESPACE, f"{run.job_id}/reverse/{item_id}")
    # forced: every block is copied, the old images are not needed
    exists = set() if force else await old_primary_images(run, p, item_id, name)

    async def plan_it(_cid: uuid.UUID) -> ReversePlan:
        view = await failover_repo.item_failover(run.pool, item_id, run.vault_id)
        item = await read_models.item(run.pool, item_id)
        try:
            view.check_reversible(name)
        except FailoverRefused as exc:
            raise StepFailed(exc.message, "reverse replication comes after a failover") from None
        if item is None:
            raise StepFailed(
                f"{name} is not failed over", "reverse replication comes after a failover"
            )
        info = view.info
        old_disks = dict(info.source_disks or {})
        recovery_disks = info.recovery_disks or []
        try:
            seeds = seed_disks(recovery_disks, old_disks, exists, force)
        except FailoverRefused as exc:
            gone = [
                old_disks.get(d.disk_id) or f"disk {d.disk_id}"
                for d in recovery_disks
                if old_disks.get(d.disk_id) not in exists
            ]
            raise StepFailed(
                exc.message,
                f"the old primary's host does not have {', '.join(gone)}",
                "pass force_full_resync to copy every block",
            ) from None
        return ReversePlan(
            new_item_id=new_item_id,
            vm_id=item.vm_id,
            vm_name=item.vm_name,
            source_agent_id=uuid.UUID(info.recovery_agent_id or ""),
            source_site=info.recovery_site or "",
            target_site=info.source_site or "",
            disks=[
                ReverseDisk(disk_id=d.disk_id, path=d.path, size_bytes=d.size_bytes)
                for d in recovery_disks
            ],
            seed_disks=[SeedDisk.model_validate(sd) for sd in seeds],
            nics=info.nics or [],
        )

    plan = await run.step(
        f"{p}reverse_plan",
        f"{name}: check the old primary's disks",
        ReversePlan,
        plan_it,
        crash="reverse_plan",
    )

    async def request(cid: uuid.UUID) -> Reversed:
        async with run.pool.acquire() as conn, conn.transaction():
            await failover_repo.insert_link(
                conn,
                run.vault_id,
                item_id,
                new_item_id,
                vm_id=plan.vm_id,
                vm_name=plan.vm_name,
                source_agent_id=plan.source_agent_id,
                source_site=plan.source_site,
                target_site=plan.target_site,
                disks=[d.model_dump(mode="json") for d in plan.disks],
                nics=[n.model_dump(mode="json") for n in plan.nics],
            )
            await repo.emit(
                conn,
                run.vault_id,
                ReverseReplicationRequested(
                    request_id=cid,
                    old_item_id=item_id,
                    new_item_id=new_item_id,
                    vm_id=plan.vm_id,
                    vm_name=plan.vm_name,
                    source_agent_id=plan.source_agent_id,
                    source_site=plan.source_site,
                    target_site=plan.target_site,
                    disks=plan.disks,
                    seed_disks=plan.seed_disks,
                    force_full_resync=force,
                ),
                str(item_id),
            )
            item = await failover_repo.item_failover(conn, item_id, run.vault_id)
            item.reversing(new_item_id, bool(plan.seed_disks))
            await failover_repo.save_item_failover(conn, item)
        return Reversed(new_item_id=new_item_id, seeded=bool(plan.seed_disks))

    await run.step(
        f"{p}reverse", f"{name}: request reverse replication", Reversed, request, crash="reverse"
    )

    async def probe() -> ReverseProtected | None:
        found = await read_models.item(run.pool, new_item_id)
        return ReverseProtected(new_item_id=new_item_id, state=found.state) if found else None

    async def wait(_cid: uuid.UUID) -> ReverseProtected:
        return await run.wait_until(
            probe, f"{name}: reverse protection enabled", run.settings.step_timeout_seconds
        )

    await run.step(
        f"{p}reverse_protected",
        f"{name}: wait for the reverse item",
        ReverseProtected,
        None,
        wait,
        crash="reverse_protected",
    )
    reversed_item = await failover_repo.item_failover(run.pool, new_item_id, run.vault_id)
    reversed_item.protected()
    await failover_repo.save_item_failover(run.pool, reversed_item)
    run.item_results[str(item_id)] = ItemResult(
        vm_name=name,
        state="reverse_replicating",
        new_item_id=str(new_item_id),
        seeded=bool(plan.seed_disks),
    )
    return new_item_id


async def failback_item(run: Run, item_id: uuid.UUID) -> None:
    """Planned failover of the reversed item back to the primary, then reverse again."""
    await planned_item(run, item_id, FailoverKind.PLANNED)
    failed_over = run.item_results[str(item_id)]  # set by the planned failover
    new_item = await reverse_item(run, item_id)
    run.item_results[str(item_id)] = failed_over.model_copy(
        update={"state": "failed_back", "new_item_id": str(new_item)}
    )


# ------------------------------------------------------------------ one operation, many items


def item_workflow(operation: Operation) -> Workflow:
    async def run_item(run: Run) -> JobResult:
        item_id = uuid.UUID(run.job.target)
        await run_items(run, operation, [item_id], None)
        result = run.item_results.get(str(item_id))
        if (
            operation is Operation.UNPLANNED_FAILOVER
            and result is not None
            and result.state == "failed"
        ):
            raise StepFailed(
                result.error or "failed",
                "the item could not be failed over",
                "check the failed tasks; try another recovery point",
            )
        return JobResult()

    return run_item


async def run_items(
    run: Run, operation: Operation, item_ids: list[uuid.UUID], test_net: TestNetwork | None
) -> list[BaseException]:
    """One operation on several items in parallel; returns the errors (planned stops after)."""
    if operation is Operation.TEST_FAILOVER and test_net is None:
        test_net = await test_network(run)
    test_jobs: set[str] = set()
    if operation is Operation.TEST_CLEANUP:
        for i in item_ids:
            test = (await failover_repo.item_failover(run.pool, i, run.vault_id)).test
            if test is not None:
                test_jobs.add(test.job_id)

    async def one(item_id: uuid.UUID) -> None:
        match operation:
            case Operation.TEST_FAILOVER:
                assert test_net is not None
                await test_item(run, item_id, test_net)
            case Operation.TEST_CLEANUP:
                await cleanup_item(run, item_id)
            case Operation.PLANNED_FAILOVER:
                await planned_item(run, item_id)
            case Operation.UNPLANNED_FAILOVER:
                await unplanned_item(run, item_id)
            case Operation.COMMIT:
                await commit_item(run, item_id)
            case Operation.REVERSE:
                await reverse_item(run, item_id)
            case Operation.FAILBACK:
                await failback_item(run, item_id)

    outcomes = await asyncio.gather(*(one(i) for i in item_ids), return_exceptions=True)
    errors: list[BaseException] = []
    for item_id, outcome in zip(item_ids, outcomes, strict=True):
        if isinstance(outcome, StepFailed):
            errors.append(outcome)
            found = run.item_results.get(str(item_id)) or _failure_result(None, item_id, outcome)
            run.item_results[str(item_id)] = found.model_copy(
                update={"state": "failed", "error": outcome.error}
            )
        elif isinstance(outcome, BaseException):
            raise outcome
    if operation is Operation.TEST_CLEANUP and test_jobs:
        await delete_test_networks(run, test_jobs)
    if errors and operation is not Operation.UNPLANNED_FAILOVER:
        first = errors[0]
        assert isinstance(first, StepFailed)
        raise first
    return errors

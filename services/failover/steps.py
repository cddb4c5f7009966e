"""The activities of the failover workflows, each one durable step of the engine
(services/failover/workflow.py) with a typed input: prepare (what a failover of an item needs:
`ItemFacts`, its NICs placed), materialise a recovery point, create a VM, shut the source down,
wait until the replica is synced, delete a VM, mark the item failed over, ask a host which
disk images it still has. Every step's key is
prefixed with the item id (`p`), so a recovery plan runs the same steps for many items.

A step's result is stored as its task's detail (JSON) and read back, when the job resumes, as
the same type (`Point`, `CreatedVm`, `FinalCycle`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.failover import item_failover_repository as failover_repo
from services.failover import job_repository as jobs_repo
from services.failover import read_model_repository as read_models
from services.failover import repository as repo
from services.failover.domain.nics import failover_nics
from services.failover.domain.points import data_loss_seconds
from services.failover.item_failover import FailoverInfo
from services.failover.workflow import Run, StepFailed, StepResult
from shared.schemas.agent import (
    DiskImagesCheckRequested,
    NicAttachment,
    VmCreateRequested,
    VmDeleteRequested,
    VmDisk,
    VmPowerRequested,
)
from shared.schemas.envelope import EventPayload
from shared.schemas.failover import (
    FailoverKind,
    MaterialisedDisk,
    PointChoice,
    RecoveryPointMaterialiseRequested,
)
from shared.schemas.inventory import Nic, VmNetwork

# ------------------------------------------------------------------ typed inputs and results


class SourceDisk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disk_id: str
    path: str = ""
    size_bytes: int


class ItemFacts(StepResult):
    """What a failover of an item needs: its VM, disks and NICs, the sites, the source agent
    and a recovery-site agent with its storage folder (and, once prepared, the placed NICs)."""

    model_config = ConfigDict(extra="forbid")

    item_id: uuid.UUID
    vm_id: str
    vm_name: str
    source_agent_id: uuid.UUID
    source_site: str
    target_site: str
    recovery_agent_id: uuid.UUID
    recovery_storage: str
    disks: list[SourceDisk]
    nics: list[Nic]
    # Failing back: the old VM (shut down, superseded) still sits in the target folder.
    replaces_old_vm: bool
    generation: int = 2
    cpu_count: int = 2
    memory_mb: int = 4096
    placed_nics: list[NicAttachment] = Field(default_factory=list)


class TestNetwork(StepResult):
    """A test failover's network: none, an existing (isolated) one, or one made for the test."""

    __test__ = False  # not a pytest test class

    model_config = ConfigDict(extra="forbid")

    network_id: str | None = None
    network: VmNetwork | None = None
    created: bool = False


class Point(StepResult):
    """A materialised recovery point (the replication service's answer)."""

    model_config = ConfigDict(extra="forbid")

    cycle_seq: int
    source_time: str
    app_consistent: bool = False
    disks: list[MaterialisedDisk]


class CreatedVm(StepResult):
    """A VM the recovery host created (with whatever else the agent answered)."""

    model_config = ConfigDict(extra="allow")

    vm_name: str
    agent_id: str
    nics: list[NicAttachment]


class FinalCycle(StepResult):
    """The source's last cycle, shipped when it shut down, and its disks' Merkle roots."""

    model_config = ConfigDict(extra="forbid")

    cycle_seq: int | None = None
    roots: dict[str, str] = Field(default_factory=dict)


class ShutdownAnswer(BaseModel):
    """What a failover reads of the source agent's answer to the shutdown: the final cycle it
    shipped (none when the VM was not replicating)."""

    model_config = ConfigDict(extra="ignore")

    class Final(BaseModel):
        model_config = ConfigDict(extra="ignore")

        cycle_seq: int | None = None
        roots: dict[str, str] = Field(default_factory=dict)

    final_cycle: Final | None = None


class Synced(StepResult):
    state: str
    latest_seq: int | None


class DiskImages(StepResult):
    """A host's answer to which disk images it has: each path's size, None where it is gone
    (missing, not a file, or outside its storage)."""

    model_config = ConfigDict(extra="ignore")

    images: dict[str, int | None]

    def present(self) -> set[str]:
        return {path for path, size in self.images.items() if size is not None}


class AgentAnswer(StepResult):
    """An agent's answer to a command, as it sent it."""

    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------ prepare


async def item_facts(run: Run, item_id: uuid.UUID) -> ItemFacts:
    pool = run.pool
    item = await read_models.item(pool, item_id)
    if item is None:
        raise StepFailed(f"protected item {item_id} is not known", "no ProtectionEnabled seen")
    link = await failover_repo.link_of(pool, new=item_id)
    vm_row = await read_models.vm(pool, item.vault_id, item.vm_id)
    vm = vm_row["vm"] if vm_row else {}
    preferred: uuid.UUID | None = None
    if link is not None:
        disks = [SourceDisk.model_validate(d) for d in link["disks"]]
        nics = [Nic.model_validate(n) for n in link["nics"]]
        source_site, target_site = link["source_site"], link["target_site"]
        old = await read_models.item(pool, link["old_item_id"])
        preferred = old.source_agent_id if old else None
    else:
        disks = [
            SourceDisk(disk_id=d["disk_id"], path=d.get("path", ""), size_bytes=d["size_bytes"])
            for d in vm.get("disks", [])
        ]
        nics = [Nic.model_validate(n) for n in vm.get("nics", [])]
        source = await read_models.producer(pool, item.source_agent_id)
        source_site = source["site"] if source else (vm_row["site"] if vm_row else "")
        target_site = await read_models.cloud_site(pool, item.vault_id, item.target_cloud_id) or ""
    if not target_site:
        raise StepFailed(
            f"the recovery site of {item.vm_name} is not known",
            "the target cloud was not discovered",
            "check the recovery site's provider",
        )
    agents = [
        a
        for a in await read_models.agents_at(pool, run.vault_id, target_site)
        if a["metadata"].get("storage_dir")
    ]
    if not agents:
        raise StepFailed(
            f"no host agent registered at the recovery site '{target_site}'",
            "a recovery host is needed to run the failed-over VM",
            "register a host agent at the recovery site, then restart the job",
        )
    agent = next((a for a in agents if a["producer_id"] == preferred), agents[0])
    return ItemFacts(
        item_id=item_id,
        vm_id=item.vm_id,
        vm_name=item.vm_name,
        source_agent_id=item.source_agent_id,
        source_site=source_site,
        target_site=target_site,
        recovery_agent_id=agent["producer_id"],
        recovery_storage=agent["metadata"]["storage_dir"],
        disks=disks,
        nics=nics,
        replaces_old_vm=link is not None,
        generation=vm.get("generation", 2),
        cpu_count=vm.get("cpu_count", 2),
        memory_mb=vm.get("memory_mb", 4096),
    )


async def place_nics(
    run: Run, facts: ItemFacts, test_net: TestNetwork | None
) -> list[NicAttachment]:
    nics = facts.nics
    if test_net is not None:
        network = test_net.network if test_net.network_id else None
        return failover_nics(nics, [], {}, set(), network, test=True)
    async with run.pool.acquire() as conn, conn.transaction():
        await jobs_repo.lock_vault_ips(conn, run.vault_id)
        nets = {
            k: VmNetwork.model_validate(v["network"])
            for k, v in (await read_models.networks(conn, run.vault_id)).items()
        }
        mapped = await read_models.mappings(conn, run.vault_id)
        used = await read_models.used_ips(conn, run.vault_id)
        placed = failover_nics(nics, mapped, nets, used)
        item = await failover_repo.item_failover(conn, facts.item_id, run.vault_id)
        item.placing(placed)
        await failover_repo.save_item_failover(conn, item)
    return placed


async def prepare(run: Run, p: str, item_id: uuid.UUID, test_net: TestNetwork | None) -> ItemFacts:
    name = await vm_name_of(run, item_id)

    async def effect(_cid: uuid.UUID) -> ItemFacts:
        facts = await item_facts(run, item_id)
        facts.placed_nics = await place_nics(run, facts, test_net)
        return facts

    return await run.step(
        f"{p}prepare",
        f"{name}: prepare (recovery host, network placement)",
        ItemFacts,
        effect,
        crash="prepare",
    )


async def vm_name_of(run: Run, item_id: uuid.UUID) -> str:
    item = await read_models.item(run.pool, item_id)
    return item.vm_name if item else str(item_id)


# ------------------------------------------------------------------ activities


async def emit(run: Run, payload: EventPayload, key: str) -> None:
    async with run.pool.acquire() as conn, conn.transaction():
        await repo.emit(conn, run.vault_id, payload, key)


def command_to(
    run: Run, agent_id: uuid.UUID, build: Callable[[uuid.UUID], EventPayload]
) -> Callable[[uuid.UUID], Awaitable[None]]:
    """A step's effect: the command `build(command_id)` to the agent `agent_id` (keyed by it,
    so the agent's commands keep their order)."""

    async def command(cid: uuid.UUID) -> None:
        await emit(run, build(cid), str(agent_id))

    return command


async def materialise(
    run: Run,
    p: str,
    facts: ItemFacts,
    folder: str,
    choice: PointChoice,
    seq: int | None,
    *,
    handover: bool = False,
    differencing: bool = False,
) -> Point:
    """The point's disks in the recovery host's folder; `handover` (a failover): the host's
    replica images themselves when it keeps them, else copies; `differencing` (a test
    failover): differencing disks over the host's replica when it keeps one, else copies."""
    target_dir = str(Path(facts.recovery_storage) / folder)

    async def request(cid: uuid.UUID) -> None:
        await emit(
            run,
            RecoveryPointMaterialiseRequested(
                request_id=cid,
                item_id=facts.item_id,
                choice=choice,
                cycle_seq=seq,
                target_dir=target_dir,
                handover=handover,
                differencing=differencing,
            ),
            str(facts.item_id),
        )

    async def answer(cid: uuid.UUID) -> Point:
        return Point.model_validate(
            await run.wait_answer(cid, f"materialising the recovery point of {facts.vm_name}")
        )

    return await run.step(
        f"{p}materialise",
        f"{facts.vm_name}: materialise recovery point into {target_dir}",
        Point,
        request,
        answer,
        crash="materialise",
    )


async def create_vm(
    run: Run,
    p: str,
    facts: ItemFacts,
    vm_id: str,
    vm_name: str,
    point: Point,
    nics: list[NicAttachment],
) -> CreatedVm:
    disks = [
        VmDisk(disk_id=d.disk_id, file=os.path.basename(d.path), size_bytes=d.size_bytes)
        for d in point.disks
    ]
    agent_id = facts.recovery_agent_id

    def create(cid: uuid.UUID) -> VmCreateRequested:
        return VmCreateRequested(
            command_id=cid,
            agent_id=agent_id,
            vm_id=vm_id,
            vm_name=vm_name,
            generation=facts.generation,
            cpu_count=facts.cpu_count,
            memory_mb=facts.memory_mb,
            disks=disks,
            nics=nics,
            start=True,
        )

    async def answer(cid: uuid.UUID) -> CreatedVm:
        result = await run.wait_answer(cid, f"creating VM {vm_name}")
        return CreatedVm.model_validate(
            {**result, "vm_name": vm_name, "agent_id": str(agent_id), "nics": nics}
        )

    return await run.step(
        f"{p}create_vm",
        f"{vm_name}: create and start the VM on the recovery host",
        CreatedVm,
        command_to(run, agent_id, create),
        answer,
        crash="create_vm",
    )


async def shutdown(run: Run, p: str, facts: ItemFacts, timeout: float | None = None) -> FinalCycle:
    agent_id = facts.source_agent_id

    def power_off(cid: uuid.UUID) -> VmPowerRequested:
        return VmPowerRequested(
            command_id=cid, agent_id=agent_id, vm_id=facts.vm_id, action="shutdown"
        )

    async def answer(cid: uuid.UUID) -> FinalCycle:
        result = await run.wait_answer(
            cid,
            f"shutting down {facts.vm_name} and shipping its final changes",
            timeout=timeout,
            recommendation="check the source host agent; for a disaster use an unplanned failover",
        )
        final = ShutdownAnswer.model_validate(result).final_cycle or ShutdownAnswer.Final()
        return FinalCycle(cycle_seq=final.cycle_seq, roots=final.roots)

    return await run.step(
        f"{p}shutdown",
        f"{facts.vm_name}: shut down the source VM, ship the final changes",
        FinalCycle,
        command_to(run, agent_id, power_off),
        answer,
        crash="shutdown",
    )


async def synced(
    run: Run, p: str, facts: ItemFacts, final_seq: int | None, timeout: float
) -> Synced:
    item_id = facts.item_id

    async def probe() -> Synced | None:
        item = await read_models.item(run.pool, item_id)
        if item is None:
            return None
        caught_up = final_seq is not None and (item.latest_seq or 0) >= final_seq
        if item.state == "synced" or caught_up:
            return Synced(state=item.state, latest_seq=item.latest_seq)
        return None

    async def wait(_cid: uuid.UUID) -> Synced:
        return await run.wait_until(probe, f"{facts.vm_name}: replica synced", timeout)

    return await run.step(
        f"{p}synced",
        f"{facts.vm_name}: wait until the replica holds the final changes",
        Synced,
        None,
        wait,
        crash="synced",
    )


async def remove_old_vm(run: Run, p: str, facts: ItemFacts) -> None:
    """Failback: delete the old, superseded VM at the target host before the point is
    materialised in its place (its disks already seeded the reverse replica)."""
    if not facts.replaces_old_vm:
        return
    await delete_vm(
        run,
        f"{p}remove_old_vm",
        f"{facts.vm_name}: remove the superseded VM at the target host",
        facts.recovery_agent_id,
        facts.vm_name,
        f"removing the old VM {facts.vm_name}",
        crash="remove_old_vm",
    )


async def delete_vm(
    run: Run,
    key: str,
    title: str,
    agent_id: uuid.UUID,
    vm_name: str,
    waiting: str,
    *,
    crash: str,
) -> AgentAnswer:
    """Step `key`: the agent `agent_id` deletes VM `vm_name`; `waiting` names what the step
    waits for if the answer does not come."""

    def delete(cid: uuid.UUID) -> VmDeleteRequested:
        return VmDeleteRequested(command_id=cid, agent_id=agent_id, vm_name=vm_name)

    async def answer(cid: uuid.UUID) -> AgentAnswer:
        return AgentAnswer.model_validate(await run.wait_answer(cid, waiting))

    command = command_to(run, agent_id, delete)
    return await run.step(key, title, AgentAnswer, command, answer, crash=crash)


async def mark_failed_over(
    run: Run,
    p: str,
    facts: ItemFacts,
    kind: FailoverKind,
    point: Point,
    vm: CreatedVm,
) -> FailoverInfo:
    async def effect(_cid: uuid.UUID) -> FailoverInfo:
        failed_over_at = datetime.now(UTC)
        source_time = datetime.fromisoformat(point.source_time)
        info = FailoverInfo(
            kind=kind,
            cycle_seq=point.cycle_seq,
            source_time=point.source_time,
            app_consistent=point.app_consistent,
            failed_over_at=failed_over_at.isoformat(),
            data_loss_seconds=data_loss_seconds(failed_over_at, source_time),
            recovery_vm_name=vm.vm_name,
            recovery_agent_id=str(facts.recovery_agent_id),
            recovery_site=facts.target_site,
            source_site=facts.source_site,
            source_disks={d.disk_id: d.path for d in facts.disks},
            recovery_disks=point.disks,
            nics=vm.nics,
            job_id=str(run.job_id),
        )
        async with run.pool.acquire() as conn, conn.transaction():
            item = await failover_repo.item_failover(conn, facts.item_id, run.vault_id)
            item.failed_over(info, vm.vm_name)
            await failover_repo.save_item_failover(conn, item)
        return info

    return await run.step(
        f"{p}failed_over",
        f"{facts.vm_name}: mark the item failed over",
        FailoverInfo,
        effect,
        crash="failed_over",
    )


async def disk_images(
    run: Run, key: str, title: str, agent_id: uuid.UUID, paths: list[str], *, crash: str
) -> DiskImages:
    """Step `key`: the agent `agent_id` says which of `paths` it has (and their sizes). A host
    that does not answer within `disk_check_timeout_seconds` (or not with its images) fails
    the step: its images cannot be relied on, reverse replication then needs a full resync."""

    async def answer(cid: uuid.UUID) -> DiskImages:
        try:
            found = await run.wait_answer(
                cid,
                f"asking host agent {agent_id} for its disks",
                timeout=run.settings.disk_check_timeout_seconds,
            )
            return DiskImages.model_validate(found)
        except StepFailed as exc:
            cause = f"the old primary's host did not say which disks it has: {exc.error}"
        except ValidationError:
            cause = f"host agent {agent_id} answered without its disk images"
        raise StepFailed(
            "old primary unreachable: pass force_full_resync",
            cause=cause,
            recommendation="bring the old primary's host agent back and restart the job, or "
            "pass force_full_resync to copy every block",
        )

    def check(cid: uuid.UUID) -> DiskImagesCheckRequested:
        return DiskImagesCheckRequested(command_id=cid, agent_id=agent_id, images=paths)

    command = command_to(run, agent_id, check)
    return await run.step(key, title, DiskImages, command, answer, crash=crash)

"""The workflows: one function per operation on one protected item (its steps keyed by the item
id, so a recovery plan runs the same steps for many items), and the recovery-plan runner (groups
in order, items of a group in parallel, pre/post actions)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.failover import domain
from services.failover import repository as repo
from services.failover.domain import ItemFailoverState as View
from services.failover.domain import Operation, PlanAction, PlanGroup
from services.failover.workflow import Run, StepFailed, Workflow
from shared.schemas.agent import VmCreateRequested, VmDeleteRequested, VmDisk, VmPowerRequested
from shared.schemas.failover import (
    FailoverKind,
    ItemFailedOver,
    ItemFailoverCommitted,
    PointChoice,
    RecoveryPointMaterialiseRequested,
    ReverseDisk,
    ReverseReplicationRequested,
    SeedDisk,
)
from shared.schemas.inventory import Nic, VmNetwork

STEPS = {
    Operation.TEST_FAILOVER: 3,
    Operation.TEST_CLEANUP: 2,
    Operation.PLANNED_FAILOVER: 7,
    Operation.UNPLANNED_FAILOVER: 6,
    Operation.COMMIT: 1,
    Operation.REVERSE: 3,
    Operation.FAILBACK: 11,
}


# ------------------------------------------------------------------ facts


def path_exists(path: str) -> bool:
    """The simulation's sites share this machine's filesystem: the old primary's disk images
    are reachable when their files exist."""
    return os.path.exists(path)


async def item_facts(run: Run, item_id: uuid.UUID) -> dict[str, Any]:
    """What a failover of the item needs: its VM, disks and NICs, the sites, the source agent
    and a recovery-site agent with its storage folder."""
    pool = run.pool
    item = await repo.item(pool, item_id)
    if item is None:
        raise StepFailed(f"protected item {item_id} is not known", "no ProtectionEnabled seen")
    link = await repo.link_of(pool, new=item_id)
    vm_row = await repo.vm(pool, item["vault_id"], item["vm_id"])
    vm = vm_row["vm"] if vm_row else {}
    preferred: uuid.UUID | None = None
    if link is not None:
        disks = list(link["disks"])
        nics = list(link["nics"])
        source_site, target_site = link["source_site"], link["target_site"]
        old = await repo.item(pool, link["old_item_id"])
        preferred = old["source_agent_id"] if old else None
    else:
        disks = [
            {"disk_id": d["disk_id"], "path": d.get("path", ""), "size_bytes": d["size_bytes"]}
            for d in vm.get("disks", [])
        ]
        nics = list(vm.get("nics", []))
        source = await repo.producer(pool, item["source_agent_id"])
        source_site = source["site"] if source else (vm_row["site"] if vm_row else "")
        target_site = await repo.cloud_site(pool, item["vault_id"], item["target_cloud_id"]) or ""
    if not target_site:
        raise StepFailed(
            f"the recovery site of {item['vm_name']} is not known",
            "the target cloud was not discovered",
            "check the recovery site's provider",
        )
    agents = [
        a
        for a in await repo.agents_at(pool, run.vault_id, target_site)
        if a["metadata"].get("storage_dir")
    ]
    if not agents:
        raise StepFailed(
            f"no host agent registered at the recovery site '{target_site}'",
            "a recovery host is needed to run the failed-over VM",
            "register a host agent at the recovery site, then restart the job",
        )
    agent = next((a for a in agents if a["producer_id"] == preferred), agents[0])
    return {
        "item_id": str(item_id),
        "vm_id": item["vm_id"],
        "vm_name": item["vm_name"],
        "source_agent_id": str(item["source_agent_id"]),
        "source_site": source_site,
        "target_site": target_site,
        "recovery_agent_id": str(agent["producer_id"]),
        "recovery_storage": agent["metadata"]["storage_dir"],
        "disks": disks,
        "nics": nics,
        # Failing back: the old VM (shut down, superseded) still sits in the target folder.
        "replaces_old_vm": link is not None,
        "generation": vm.get("generation", 2),
        "cpu_count": vm.get("cpu_count", 2),
        "memory_mb": vm.get("memory_mb", 4096),
    }


async def place_nics(
    run: Run, facts: dict[str, Any], test_net: dict[str, Any] | None
) -> list[dict[str, Any]]:
    nics = [Nic.model_validate(n) for n in facts["nics"]]
    if test_net is not None:
        network = (
            VmNetwork.model_validate(test_net["network"]) if test_net.get("network_id") else None
        )
        placed = domain.failover_nics(nics, [], {}, set(), network, test=True)
        return [p.model_dump(mode="json") for p in placed]
    async with run.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"ips:{run.vault_id}")
        nets = {
            k: VmNetwork.model_validate(v["network"])
            for k, v in (await repo.networks(conn, run.vault_id)).items()
        }
        mapped = await repo.mappings(conn, run.vault_id)
        used = await repo.used_ips(conn, run.vault_id)
        placed = domain.failover_nics(nics, mapped, nets, used)
        out = [p.model_dump(mode="json") for p in placed]
        await repo.set_view(
            conn,
            uuid.UUID(facts["item_id"]),
            run.vault_id,
            View.FAILOVER_IN_PROGRESS,
            info={"nics": out},
        )
    return out


# ------------------------------------------------------------------ common steps


async def emit(run: Run, payload: Any, key: str) -> None:
    async with run.pool.acquire() as conn, conn.transaction():
        await repo.emit(conn, run.vault_id, payload, key)


async def materialise(
    run: Run,
    p: str,
    facts: dict[str, Any],
    folder: str,
    choice: PointChoice,
    seq: int | None,
    *,
    handover: bool = False,
    differencing: bool = False,
) -> dict[str, Any]:
    """The point's disks in the recovery host's folder; `handover` (a failover): the host's
    replica images themselves when it keeps them, else copies; `differencing` (a test
    failover): differencing disks over the host's replica when it keeps one, else copies."""
    target_dir = str(Path(facts["recovery_storage"]) / folder)

    async def request(cid: uuid.UUID) -> None:
        await emit(
            run,
            RecoveryPointMaterialiseRequested(
                request_id=cid,
                item_id=uuid.UUID(facts["item_id"]),
                choice=choice,
                cycle_seq=seq,
                target_dir=target_dir,
                handover=handover,
                differencing=differencing,
            ),
            facts["item_id"],
        )

    async def answer(cid: uuid.UUID) -> dict[str, Any]:
        return await run.wait_answer(cid, f"materialising the recovery point of {facts['vm_name']}")

    return await run.step(
        f"{p}materialise",
        f"{facts['vm_name']}: materialise recovery point into {target_dir}",
        request,
        answer,
        crash="materialise",
    )


async def create_vm(
    run: Run,
    p: str,
    facts: dict[str, Any],
    vm_id: str,
    vm_name: str,
    point: dict[str, Any],
    nics: list[dict[str, Any]],
) -> dict[str, Any]:
    disks = [
        VmDisk(disk_id=d["disk_id"], file=os.path.basename(d["path"]), size_bytes=d["size_bytes"])
        for d in point["disks"]
    ]
    agent_id = uuid.UUID(facts["recovery_agent_id"])

    async def command(cid: uuid.UUID) -> None:
        await emit(
            run,
            VmCreateRequested(
                command_id=cid,
                agent_id=agent_id,
                vm_id=vm_id,
                vm_name=vm_name,
                generation=facts["generation"],
                cpu_count=facts["cpu_count"],
                memory_mb=facts["memory_mb"],
                disks=disks,
                nics=nics,  # type: ignore[arg-type]
                start=True,
            ),
            str(agent_id),
        )

    async def answer(cid: uuid.UUID) -> dict[str, Any]:
        result = await run.wait_answer(cid, f"creating VM {vm_name}")
        return {**result, "vm_name": vm_name, "agent_id": str(agent_id), "nics": nics}

    return await run.step(
        f"{p}create_vm",
        f"{vm_name}: create and start the VM on the recovery host",
        command,
        answer,
        crash="create_vm",
    )


async def shutdown(
    run: Run, p: str, facts: dict[str, Any], timeout: float | None = None
) -> dict[str, Any]:
    agent_id = uuid.UUID(facts["source_agent_id"])

    async def command(cid: uuid.UUID) -> None:
        await emit(
            run,
            VmPowerRequested(
                command_id=cid, agent_id=agent_id, vm_id=facts["vm_id"], action="shutdown"
            ),
            str(agent_id),
        )

    async def answer(cid: uuid.UUID) -> dict[str, Any]:
        result = await run.wait_answer(
            cid,
            f"shutting down {facts['vm_name']} and shipping its final changes",
            timeout=timeout,
            recommendation="check the source host agent; for a disaster use an unplanned failover",
        )
        final = result.get("final_cycle") or {}
        return {"cycle_seq": final.get("cycle_seq"), "roots": final.get("roots", {})}

    return await run.step(
        f"{p}shutdown",
        f"{facts['vm_name']}: shut down the source VM, ship the final changes",
        command,
        answer,
        crash="shutdown",
    )


async def synced(
    run: Run, p: str, facts: dict[str, Any], final_seq: int | None, timeout: float
) -> dict[str, Any]:
    item_id = uuid.UUID(facts["item_id"])

    async def probe() -> dict[str, Any] | None:
        item = await repo.item(run.pool, item_id)
        if item is None:
            return None
        caught_up = final_seq is not None and (item["latest_seq"] or 0) >= final_seq
        if item["state"] == "synced" or (caught_up and item["state"] != "replicating"):
            return {"state": item["state"], "latest_seq": item["latest_seq"]}
        if caught_up:
            return {"state": item["state"], "latest_seq": item["latest_seq"]}
        return None

    async def wait(_cid: uuid.UUID) -> dict[str, Any]:
        return await run.wait_until(probe, f"{facts['vm_name']}: replica synced", timeout)

    return await run.step(
        f"{p}synced",
        f"{facts['vm_name']}: wait until the replica holds the final changes",
        None,
        wait,
        crash="synced",
    )


async def remove_old_vm(run: Run, p: str, facts: dict[str, Any]) -> None:
    """Failback: delete the old, superseded VM at the target host before the point is
    materialised in its place (its disks already seeded the reverse replica)."""
    if not facts.get("replaces_old_vm"):
        return
    await delete_vm(
        run,
        f"{p}remove_old_vm",
        f"{facts['vm_name']}: remove the superseded VM at the target host",
        uuid.UUID(facts["recovery_agent_id"]),
        facts["vm_name"],
        f"removing the old VM {facts['vm_name']}",
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
) -> dict[str, Any]:
    """Step `key`: the agent `agent_id` deletes VM `vm_name`; `waiting` names what the step
    waits for if the answer does not come."""

    async def command(cid: uuid.UUID) -> None:
        await emit(
            run,
            VmDeleteRequested(command_id=cid, agent_id=agent_id, vm_name=vm_name),
            str(agent_id),
        )

    async def answer(cid: uuid.UUID) -> dict[str, Any]:
        return await run.wait_answer(cid, waiting)

    return await run.step(key, title, command, answer, crash=crash)


async def mark_failed_over(
    run: Run,
    p: str,
    facts: dict[str, Any],
    kind: FailoverKind,
    point: dict[str, Any],
    vm: dict[str, Any],
) -> dict[str, Any]:
    item_id = uuid.UUID(facts["item_id"])

    async def effect(_cid: uuid.UUID) -> dict[str, Any]:
        failed_over_at = datetime.now(UTC)
        source_time = datetime.fromisoformat(point["source_time"])
        info = {
            "kind": kind.value,
            "cycle_seq": point["cycle_seq"],
            "source_time": point["source_time"],
            "app_consistent": point.get("app_consistent", False),
            "failed_over_at": failed_over_at.isoformat(),
            "data_loss_seconds": domain.data_loss_seconds(failed_over_at, source_time),
            "recovery_vm_name": vm["vm_name"],
            "recovery_agent_id": facts["recovery_agent_id"],
            "recovery_site": facts["target_site"],
            "source_site": facts["source_site"],
            "source_disks": {d["disk_id"]: d["path"] for d in facts["disks"]},
            "recovery_disks": point["disks"],
            "nics": vm.get("nics", []),
            "job_id": str(run.job_id),
        }
        async with run.pool.acquire() as conn, conn.transaction():
            await repo.emit(
                conn,
                run.vault_id,
                ItemFailedOver(
                    item_id=item_id,
                    kind=kind,
                    cycle_seq=point["cycle_seq"],
                    recovery_vm_name=vm["vm_name"],
                    recovery_agent_id=uuid.UUID(facts["recovery_agent_id"]),
                ),
                facts["item_id"],
            )
            await repo.set_view(conn, item_id, run.vault_id, View.FAILED_OVER, info=info)
        return info

    return await run.step(
        f"{p}failed_over",
        f"{facts['vm_name']}: mark the item failed over",
        effect,
        crash="failed_over",
    )


async def prepare(
    run: Run, p: str, item_id: uuid.UUID, test_net: dict[str, Any] | None
) -> dict[str, Any]:
    name = await vm_name_of(run, item_id)

    async def effect(_cid: uuid.UUID) -> dict[str, Any]:
        facts = await item_facts(run, item_id)
        facts["placed_nics"] = await place_nics(run, facts, test_net)
        return facts

    return await run.step(
        f"{p}prepare",
        f"{name}: prepare (recovery host, network placement)",
        effect,
        crash="prepare",
    )


async def vm_name_of(run: Run, item_id: uuid.UUID) -> str:
    item = await repo.item(run.pool, item_id)
    return str(item["vm_name"]) if item else str(item_id)


def _failure_result(
    facts: dict[str, Any] | None, item_id: uuid.UUID, exc: StepFailed
) -> dict[str, Any]:
    return {
        "vm_name": (facts or {}).get("vm_name", str(item_id)),
        "state": "failed",
        "error": exc.error,
    }


# ------------------------------------------------------------------ item workflows


async def test_item(run: Run, item_id: uuid.UUID, test_net: dict[str, Any]) -> None:
    params = run.job["params"]
    p = f"{item_id}:"
    facts = await prepare(run, p, item_id, test_net)
    test_name = f"{facts['vm_name']}-test"
    async with run.pool.acquire() as conn:
        current = await repo.view(conn, item_id)
        await repo.set_view(
            conn,
            item_id,
            run.vault_id,
            View.TESTING,
            test={
                "job_id": str(run.job_id),
                "vm_name": test_name,
                "agent_id": facts["recovery_agent_id"],
                "network_id": test_net.get("network_id"),
                "network_created": test_net.get("created", False),
                "started_at": (current or {}).get("test", {}).get("started_at")
                if current and current.get("test")
                else datetime.now(UTC).isoformat(),
                "previous_state": (current or {}).get("state", View.PROTECTED.value)
                if (current or {}).get("state") != View.TESTING
                else (current or {}).get("test", {}).get("previous_state", View.PROTECTED.value),
            },
        )
    point = await materialise(
        run,
        p,
        facts,
        test_name,
        PointChoice(params.get("choice", "latest")),
        params.get("cycle_seq"),
        differencing=True,
    )
    vm = await create_vm(
        run, p, facts, f"{facts['vm_id']}-test", test_name, point, facts["placed_nics"]
    )
    run.item_results[str(item_id)] = {
        "vm_name": facts["vm_name"],
        "state": "testing",
        "test_vm": vm["vm_name"],
        "cycle_seq": point["cycle_seq"],
        "source_time": point["source_time"],
        "test_network_id": test_net.get("network_id"),
    }


async def cleanup_item(run: Run, item_id: uuid.UUID) -> None:
    p = f"{item_id}:"
    view = await repo.view(run.pool, item_id)
    test = (view or {}).get("test")
    name = await vm_name_of(run, item_id)
    if not test:
        run.item_results[str(item_id)] = {"vm_name": name, "state": "no test to clean up"}
        return
    await delete_vm(
        run,
        f"{p}delete_vm",
        f"{name}: delete test VM {test['vm_name']}",
        uuid.UUID(test["agent_id"]),
        test["vm_name"],
        f"deleting test VM {test['vm_name']}",
        crash="delete_vm",
    )

    async def record(_cid: uuid.UUID) -> dict[str, Any]:
        note = {
            "at": datetime.now(UTC).isoformat(),
            "job_id": str(run.job_id),
            "test_job_id": test["job_id"],
            "notes": run.job["params"].get("notes", ""),
        }
        await repo.set_view(
            run.pool,
            item_id,
            run.vault_id,
            test.get("previous_state", View.PROTECTED.value),
            test=None,
            note=note,
        )
        return note

    await run.step(f"{p}notes", f"{name}: record cleanup notes", record, crash="notes")
    run.item_results[str(item_id)] = {"vm_name": name, "state": "cleaned up"}


async def planned_item(
    run: Run, item_id: uuid.UUID, kind: FailoverKind = FailoverKind.PLANNED
) -> None:
    p = f"{item_id}:"
    facts = await prepare(run, p, item_id, None)
    try:
        final = await shutdown(run, p, facts)
        await synced(run, p, facts, final["cycle_seq"], run.settings.step_timeout_seconds)
        await remove_old_vm(run, p, facts)
        point = await materialise(
            run, p, facts, facts["vm_name"], PointChoice.LATEST, None, handover=True
        )

        async def prove(_cid: uuid.UUID) -> dict[str, Any]:
            roots = {d["disk_id"]: d["merkle_root"] for d in point["disks"]}
            ok, why = domain.zero_data_loss(roots, final["roots"])
            if not ok:
                raise StepFailed(
                    f"zero data loss not proven for {facts['vm_name']}: {why}",
                    cause="the replica differs from the source's final state",
                    recommendation="do not use this copy; resync the item and re-run the "
                    "planned failover",
                )
            return {"proven": True, "roots": roots, "final_cycle_seq": final["cycle_seq"]}

        proof = await run.step(
            f"{p}prove",
            f"{facts['vm_name']}: prove zero data loss (Merkle roots)",
            prove,
            crash="prove",
        )
        vm = await create_vm(
            run, p, facts, facts["vm_id"], facts["vm_name"], point, facts["placed_nics"]
        )
        info = await mark_failed_over(run, p, facts, kind, point, vm)
    except StepFailed:
        await repo.set_view(run.pool, item_id, run.vault_id, View.FAILOVER_FAILED)
        raise
    run.item_results[str(item_id)] = {
        "vm_name": facts["vm_name"],
        "state": "failed_over",
        "cycle_seq": point["cycle_seq"],
        "zero_data_loss": proof["proven"],
        "data_loss_seconds": 0.0,
        "recovery_vm": vm["vm_name"],
        "failed_over_at": info["failed_over_at"],
    }


async def unplanned_item(run: Run, item_id: uuid.UUID) -> None:
    params = run.job["params"]
    p = f"{item_id}:"
    facts = await prepare(run, p, item_id, None)
    errors: list[str] = []
    if params.get("shutdown_source", False):
        try:
            final = await shutdown(run, p, facts, timeout=run.settings.sync_timeout_seconds)
            await synced(run, p, facts, final["cycle_seq"], run.settings.sync_timeout_seconds)
        except StepFailed as exc:
            run.errors += 1
            errors.append(exc.error)
    try:
        point = await materialise(
            run,
            p,
            facts,
            facts["vm_name"],
            PointChoice(params.get("choice", "latest")),
            params.get("cycle_seq"),
            handover=True,
        )
        vm = await create_vm(
            run, p, facts, facts["vm_id"], facts["vm_name"], point, facts["placed_nics"]
        )
        info = await mark_failed_over(run, p, facts, FailoverKind.UNPLANNED, point, vm)
    except StepFailed as exc:
        run.errors += 1
        await repo.set_view(run.pool, item_id, run.vault_id, View.FAILOVER_FAILED)
        run.item_results[str(item_id)] = {
            **_failure_result(facts, item_id, exc),
            "errors": [*errors, exc.error],
        }
        return
    run.item_results[str(item_id)] = {
        "vm_name": facts["vm_name"],
        "state": "failed_over",
        "cycle_seq": point["cycle_seq"],
        "source_time": point["source_time"],
        "failed_over_at": info["failed_over_at"],
        "data_loss_seconds": info["data_loss_seconds"],
        "recovery_vm": vm["vm_name"],
        "errors": errors,
    }


async def commit_item(run: Run, item_id: uuid.UUID) -> None:
    p = f"{item_id}:"
    name = await vm_name_of(run, item_id)

    async def effect(_cid: uuid.UUID) -> dict[str, Any]:
        view = await repo.view(run.pool, item_id)
        if not view or view["state"] not in (View.FAILED_OVER, View.COMMITTED):
            raise StepFailed(f"{name} is not failed over", "commit comes after a failover")
        seq = int(view["info"]["cycle_seq"])
        async with run.pool.acquire() as conn, conn.transaction():
            await repo.emit(
                conn,
                run.vault_id,
                ItemFailoverCommitted(item_id=item_id, cycle_seq=seq),
                str(item_id),
            )
            await repo.set_view(
                conn,
                item_id,
                run.vault_id,
                View.COMMITTED,
                info={"committed_at": datetime.now(UTC).isoformat()},
            )
        return {"cycle_seq": seq}

    done = await run.step(
        f"{p}commit", f"{name}: commit the failover (keep point only)", effect, crash="commit"
    )
    run.item_results[str(item_id)] = {
        "vm_name": name,
        "state": "committed",
        "cycle_seq": done["cycle_seq"],
    }


async def reverse_item(run: Run, item_id: uuid.UUID) -> uuid.UUID:
    p = f"{item_id}:"
    name = await vm_name_of(run, item_id)
    force = bool(run.job["params"].get("force_full_resync", False))
    new_item_id = uuid.uuid5(domain.NAMESPACE, f"{run.job_id}/reverse/{item_id}")

    async def plan_it(_cid: uuid.UUID) -> dict[str, Any]:
        view = await repo.view(run.pool, item_id)
        item = await repo.item(run.pool, item_id)
        if (
            not view
            or item is None
            or view["state"] not in (View.FAILED_OVER, View.COMMITTED, View.REVERSE_REPLICATING)
        ):
            raise StepFailed(
                f"{name} is not failed over", "reverse replication comes after a failover"
            )
        info = view["info"]
        old_disks = dict(info.get("source_disks", {}))
        exists = {path for path in old_disks.values() if path and path_exists(path)}
        try:
            seeds = domain.seed_disks(info["recovery_disks"], old_disks, exists, force)
        except domain.FailoverRefused as exc:
            raise StepFailed(
                exc.message, "the old primary's disks are gone", "pass force_full_resync"
            ) from None
        return {
            "new_item_id": str(new_item_id),
            "vm_id": item["vm_id"],
            "vm_name": item["vm_name"],
            "source_agent_id": info["recovery_agent_id"],
            "source_site": info["recovery_site"],
            "target_site": info["source_site"],
            "disks": [
                {"disk_id": d["disk_id"], "path": d["path"], "size_bytes": d["size_bytes"]}
                for d in info["recovery_disks"]
            ],
            "seed_disks": seeds,
            "nics": info.get("nics", []),
        }

    plan = await run.step(
        f"{p}reverse_plan", f"{name}: check the old primary's disks", plan_it, crash="reverse_plan"
    )

    async def request(cid: uuid.UUID) -> dict[str, Any]:
        async with run.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO item_links (old_item_id, new_item_id, vault_id, vm_id, vm_name,"
                " source_agent_id, source_site, target_site, disks, nics)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) ON CONFLICT DO NOTHING",
                item_id,
                new_item_id,
                run.vault_id,
                plan["vm_id"],
                plan["vm_name"],
                uuid.UUID(plan["source_agent_id"]),
                plan["source_site"],
                plan["target_site"],
                plan["disks"],
                plan["nics"],
            )
            await repo.emit(
                conn,
                run.vault_id,
                ReverseReplicationRequested(
                    request_id=cid,
                    old_item_id=item_id,
                    new_item_id=new_item_id,
                    vm_id=plan["vm_id"],
                    vm_name=plan["vm_name"],
                    source_agent_id=uuid.UUID(plan["source_agent_id"]),
                    source_site=plan["source_site"],
                    target_site=plan["target_site"],
                    disks=[ReverseDisk.model_validate(d) for d in plan["disks"]],
                    seed_disks=[SeedDisk.model_validate(s) for s in plan["seed_disks"]],
                    force_full_resync=force,
                ),
                str(item_id),
            )
            await repo.set_view(
                conn,
                item_id,
                run.vault_id,
                View.REVERSE_REPLICATING,
                info={"reversed_by": str(new_item_id), "seeded": bool(plan["seed_disks"])},
            )
        return {"new_item_id": str(new_item_id), "seeded": bool(plan["seed_disks"])}

    await run.step(f"{p}reverse", f"{name}: request reverse replication", request, crash="reverse")

    async def probe() -> dict[str, Any] | None:
        found = await repo.item(run.pool, new_item_id)
        return {"new_item_id": str(new_item_id), "state": found["state"]} if found else None

    async def wait(_cid: uuid.UUID) -> dict[str, Any]:
        return await run.wait_until(
            probe, f"{name}: reverse protection enabled", run.settings.step_timeout_seconds
        )

    await run.step(
        f"{p}reverse_protected",
        f"{name}: wait for the reverse item",
        None,
        wait,
        crash="reverse_protected",
    )
    await repo.set_view(run.pool, new_item_id, run.vault_id, View.PROTECTED)
    run.item_results[str(item_id)] = {
        "vm_name": name,
        "state": "reverse_replicating",
        "new_item_id": str(new_item_id),
        "seeded": bool(plan["seed_disks"]),
    }
    return new_item_id


async def failback_item(run: Run, item_id: uuid.UUID) -> None:
    """Planned failover of the reversed item back to the primary, then reverse again."""
    await planned_item(run, item_id, FailoverKind.PLANNED)
    result = dict(run.item_results.get(str(item_id), {}))
    new_item = await reverse_item(run, item_id)
    run.item_results[str(item_id)] = {
        **result,
        "state": "failed_back",
        "new_item_id": str(new_item),
    }


# ------------------------------------------------------------------ test networks


async def test_network(run: Run) -> dict[str, Any]:
    """The test network: none, an existing (isolated) one, or one created for this test."""
    choice = run.job["params"].get("network", "none")
    if choice == "none":
        return {"network_id": None}

    async def effect(_cid: uuid.UUID) -> dict[str, Any]:
        nets = await repo.networks(run.pool, run.vault_id)
        if choice != "create":
            if choice not in nets:
                raise StepFailed(
                    f"test network {choice} is not known",
                    "not discovered",
                    "choose another network",
                )
            return {"network_id": choice, "network": nets[choice]["network"], "created": False}
        network_id = f"test-{run.job_id.hex[:12]}"
        site = run.job["params"].get("target_site") or ""
        template: dict[str, Any] = next(
            (
                n["network"]
                for n in nets.values()
                if n["site"] == site and not n["network"].get("isolated")
            ),
            {"subnets": []},
        )
        network = {
            "network_id": network_id,
            "name": f"test-failover-{run.job_id.hex[:8]}",
            "subnets": template.get("subnets", []),
            "isolated": True,
        }
        await run.pool.execute(
            "INSERT INTO test_networks (network_id, vault_id, job_id, site, name)"
            " VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING",
            network_id,
            run.vault_id,
            run.job_id,
            site,
            network["name"],
        )
        return {"network_id": network_id, "network": network, "created": True}

    return await run.step("network", f"test network: {choice}", effect, crash="network")


async def delete_test_networks(run: Run, test_job_ids: set[str]) -> None:
    rows = await run.pool.fetch(
        "SELECT network_id FROM test_networks WHERE job_id = ANY($1::uuid[])"
        " AND deleted_at IS NULL",
        [uuid.UUID(j) for j in test_job_ids],
    )
    for row in rows:

        async def effect(_cid: uuid.UUID, network_id: str = row["network_id"]) -> dict[str, Any]:
            await run.pool.execute(
                "UPDATE test_networks SET deleted_at = now() WHERE network_id = $1", network_id
            )
            return {"network_id": network_id, "deleted": True}

        await run.step(
            f"delete_network:{row['network_id']}",
            f"delete test network {row['network_id']}",
            effect,
            crash="delete_network",
        )


# ------------------------------------------------------------------ one-item jobs


def item_workflow(operation: Operation) -> Workflow:
    async def run_item(run: Run) -> dict[str, Any]:
        item_id = uuid.UUID(run.job["target"])
        await run_items(run, operation, [item_id], None)
        if (
            operation is Operation.UNPLANNED_FAILOVER
            and run.item_results.get(str(item_id), {}).get("state") == "failed"
        ):
            raise StepFailed(
                run.item_results[str(item_id)]["error"],
                "the item could not be failed over",
                "check the failed tasks; try another recovery point",
            )
        return {}

    return run_item


async def run_items(
    run: Run, operation: Operation, item_ids: list[uuid.UUID], test_net: dict[str, Any] | None
) -> list[BaseException]:
    """One operation on several items in parallel; returns the errors (planned stops after)."""
    if operation is Operation.TEST_FAILOVER and test_net is None:
        test_net = await test_network(run)
    test_jobs: set[str] = set()
    if operation is Operation.TEST_CLEANUP:
        for i in item_ids:
            view = await repo.view(run.pool, i)
            if view and view.get("test"):
                test_jobs.add(view["test"]["job_id"])

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
            run.item_results.setdefault(str(item_id), _failure_result(None, item_id, outcome))
            run.item_results[str(item_id)].update(state="failed", error=outcome.error)
        elif isinstance(outcome, BaseException):
            raise outcome
    if operation is Operation.TEST_CLEANUP and test_jobs:
        await delete_test_networks(run, test_jobs)
    if errors and operation is not Operation.UNPLANNED_FAILOVER:
        first = errors[0]
        assert isinstance(first, StepFailed)
        raise first
    return errors


# ------------------------------------------------------------------ recovery plans


async def _bounded_read(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    """Read a stream to its end, keeping only its last `limit` bytes."""
    kept = bytearray()
    while stream is not None and (chunk := await stream.read(65_536)):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
    return bytes(kept)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def run_action(run: Run, key: str, action: PlanAction) -> None:
    if action.kind == "manual":
        await run.manual(key, action.model_dump(mode="json"))
        return
    settings = run.settings
    timeout = action.timeout_seconds or settings.script_timeout_seconds
    secrets = domain.environment_secrets(dict(os.environ))

    def excerpt(data: bytes, limit: int) -> str:
        return domain.excerpt(data, limit, secrets)

    async def effect(_cid: uuid.UUID) -> dict[str, Any]:
        assert action.script is not None
        try:
            path = domain.script_file(settings.scripts_dir, action.script)
            proc = await asyncio.create_subprocess_exec(
                str(path),
                *action.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=path.parent,
                start_new_session=True,
                env=domain.script_env(
                    settings.script_path,
                    {
                        "job_id": str(run.job_id),
                        "operation": run.job["operation"],
                        "vault_id": str(run.vault_id),
                        "target": str(run.job["target"]),
                        "action_id": action.action_id,
                    },
                ),
            )
        except (OSError, ValueError) as exc:
            raise StepFailed(
                f"script {action.name} could not start: {excerpt(str(exc).encode(), 500)}",
                "the script is missing from the scripts folder or is not executable",
                "put the script in the failover service's scripts folder, then restart the job",
            ) from None
        limit = settings.script_output_bytes
        reads = asyncio.gather(_bounded_read(proc.stdout, limit), _bounded_read(proc.stderr, limit))

        async def finish() -> tuple[bytes, bytes]:
            out_err = await asyncio.shield(reads)
            await proc.wait()
            return out_err

        timed_out = False
        try:
            out, err = await asyncio.wait_for(finish(), timeout)
        except TimeoutError:
            timed_out = True
        finally:
            if proc.returncode is None:
                _kill_group(proc)
        if timed_out:
            try:  # whatever it wrote until killed (a child that left the group may hold a pipe)
                out, err = await asyncio.wait_for(asyncio.shield(reads), 5)
            except TimeoutError:
                reads.cancel()
                out, err = b"", b""
            await proc.wait()
        why = domain.script_failure(proc.returncode, excerpt(err, 500), timed_out, timeout)
        if why:
            raise StepFailed(
                f"script {action.name} failed: {why}",
                "a script action fails on a timeout, a non-zero exit or any stderr output",
                "fix the script, then restart the job",
            )
        return {
            "returncode": proc.returncode,
            "output": excerpt(out, settings.script_excerpt_chars),
        }

    await run.step(key, f"script: {action.name}", effect, crash="script")


def plan_workflow(operation: Operation) -> Workflow:
    async def run_plan(run: Run) -> dict[str, Any]:
        groups = [PlanGroup.model_validate(g) for g in run.job["params"]["groups"]]
        kind = domain.OPERATION_KIND.get(operation)
        goes_on = operation is Operation.UNPLANNED_FAILOVER
        test_net = await test_network(run) if operation is Operation.TEST_FAILOVER else None
        for g_no, group in enumerate(groups, 1):
            for stage, actions in (
                ("pre", group.pre_actions),
                ("items", None),
                ("post", group.post_actions),
            ):
                if actions is None:
                    ids = [await repo.current_item(run.pool, i) for i in group.items]
                    await run_items(run, operation, ids, test_net)
                    continue
                for action in domain.actions_for(actions, kind):
                    try:
                        await run_action(run, f"group{g_no}:{stage}:{action.action_id}", action)
                    except StepFailed:
                        if not goes_on:
                            raise
                        run.errors += 1
        return {"groups": len(groups)}

    return run_plan


def workflows() -> dict[str, Workflow]:
    """Job kind (`item:<operation>` / `plan:<operation>`) -> workflow."""
    out: dict[str, Workflow] = {}
    for op in Operation:
        out[f"item:{op.value}"] = item_workflow(op)
        out[f"plan:{op.value}"] = plan_workflow(op)
    return out

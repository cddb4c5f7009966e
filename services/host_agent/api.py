"""Local admin routes of the host agent (bound to loopback; bearer = the agent's own
credential): create VMs, drive their workload, write blocks, see replication status."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from services.host_agent import differencing
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_format import ReplicaError
from services.host_agent.runtime import AgentRuntime
from services.host_agent.vms import (
    NAME,
    VmNotFound,
    create_vm,
    disk_path,
    list_vms,
    load_vm,
    parse_size,
)
from services.host_agent.workload import Pattern, Writer, write_blocks
from shared.schemas.inventory import VmState
from shared.signing import constant_time_equals, hash_secret


class CreateVm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    disks: list[str | int] = Field(min_length=1, max_length=16, description="Sizes: 64MiB, ...")
    generation: Literal[1, 2] = 2
    cpu: int = Field(default=2, ge=1, le=240)
    memory_mb: int = Field(default=4096, ge=32)


class SetWorkload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blocks_per_second: float = Field(ge=0, le=10_000, description="0 stops the workload.")
    pattern: Pattern = Pattern.RANDOM


class WriteBlocks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blocks: int = Field(ge=1, le=100_000)
    pattern: Pattern = Pattern.RANDOM


def runtime_of(request: Request) -> AgentRuntime:
    runtime: AgentRuntime = request.app.state.runtime
    return runtime


def require_agent_credential(request: Request) -> AgentRuntime:
    runtime = runtime_of(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(
            401,
            "send the agent's credential as 'Authorization: Bearer <credential>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    identity = runtime.identity
    if identity is None or not constant_time_equals(
        hash_secret(token), hash_secret(identity.credential)
    ):
        raise HTTPException(401, "not this agent's credential")
    return runtime


Agent = Annotated[AgentRuntime, Depends(require_agent_credential)]


def add_routes(app: FastAPI) -> None:
    router = APIRouter(prefix="/v1", tags=["admin"])

    @router.post("/vms", status_code=201, summary="Create a VM folder with sparse disks")
    async def create(body: CreateVm, agent: Agent) -> dict[str, Any]:
        try:
            sizes = [s if isinstance(s, int) else parse_size(s) for s in body.disks]
            vm = create_vm(
                agent.agent_settings.storage_dir,
                body.name,
                sizes,
                generation=body.generation,
                cpu=body.cpu,
                memory_mb=body.memory_mb,
            )
        except FileExistsError as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return vm.model_dump()

    @router.get("/vms", summary="The VMs in the storage folder")
    async def vms(agent: Agent) -> list[dict[str, Any]]:
        return [vm.model_dump() for vm in list_vms(agent.agent_settings.storage_dir)]

    @router.post("/vms/{name}/workload", summary="Start (rate > 0) or stop a VM's workload")
    async def workload(name: str, body: SetWorkload, agent: Agent) -> dict[str, Any]:
        vm = _running_vm(agent, name, body.blocks_per_second > 0)
        if body.blocks_per_second == 0:
            agent.workloads.stop(vm.name)
        else:
            agent.workloads.start(vm, body.blocks_per_second, body.pattern)
        return {"vm": vm.name, "blocks_per_second": body.blocks_per_second, "pattern": body.pattern}

    @router.post("/vms/{name}/writes", summary="Write N blocks now, through the journal")
    async def writes(name: str, body: WriteBlocks, agent: Agent) -> dict[str, Any]:
        """`completed_at`: the host's clock when the last write was done; a recovery point
        whose `source_time` is not before it holds every one of these writes."""
        vm = _running_vm(agent, name, True)
        writer = Writer(agent.agent_settings.storage_dir, vm, body.pattern)
        written = write_blocks(agent.host, writer, body.blocks)
        return {"vm": vm.name, "written": written, "completed_at": datetime.now(UTC).isoformat()}

    @router.get(
        "/vms/{name}/disks/{disk_id}/sha256",
        summary="SHA-256 of a VM's disk as the VM reads it (through a differencing disk)",
    )
    async def disk_sha256(name: str, disk_id: str, agent: Agent) -> dict[str, Any]:
        """A test failover's disk is read through its overlay and the replica's frozen view;
        any other disk is its image file."""
        vm = _running_vm(agent, name, False)
        disk = next((d for d in vm.disks if d.id == disk_id), None)
        if disk is None:
            raise HTTPException(404, f"VM '{name}' has no disk '{disk_id}'")
        path = disk_path(agent.agent_settings.storage_dir, vm, disk)
        try:
            digest = await asyncio.to_thread(disk_sha256_of, agent.replica, path)
        except (OSError, ReplicaError) as exc:
            raise HTTPException(
                409, f"disk '{disk_id}' of VM '{name}' is unreadable: {exc}"
            ) from None
        return {
            "vm": name,
            "disk_id": disk_id,
            "differencing": differencing.is_differencing(path),
            "size_bytes": disk.size_bytes,
            "sha256": digest,
        }

    @router.get("/items", summary="Replication status per protected item")
    async def items(agent: Agent) -> list[dict[str, Any]]:
        return agent.replicator.status() if agent.replicator else []

    app.include_router(router)


def _running_vm(agent: AgentRuntime, name: str, must_run: bool) -> Any:
    try:
        vm = load_vm(agent.agent_settings.storage_dir, name)
    except VmNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    if must_run and vm.state is not VmState.RUNNING:
        raise HTTPException(409, f"VM '{name}' is {vm.state.value}: start it first")
    return vm


def disk_sha256_of(replica: SiteReplica, path: Path) -> str:
    if differencing.is_differencing(path):
        return differencing.sha256(replica, path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()

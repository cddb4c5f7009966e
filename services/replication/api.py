"""HTTP routes of the replication service: translate requests into handler calls."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.replication import domain, handlers, offline
from services.replication import read_model_repository as rm_repo
from services.replication import repository as repo
from services.replication.context import Context
from services.replication.host_points import HostFailed, HostSilent, ask_host, replica_reaches
from services.replication.materialise import REPLICA_WAIT_SECONDS, materialise_target
from services.replication.store import UnknownPoint
from shared.auth import CurrentPrincipal
from shared.files import OutsideRoots, confined
from shared.readmodels import until_known
from shared.schemas.registration import Role
from shared.schemas.replication import Health, ItemState

router = APIRouter(prefix="/v1/vaults/{vault_id}/protected-items", tags=["protected items"])


class EnableIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vm_id: str = Field(min_length=1, max_length=100)


class ItemOut(BaseModel):
    item_id: uuid.UUID
    vault_id: uuid.UUID
    vm_id: str
    vm_name: str
    pairing_id: uuid.UUID
    policy_id: uuid.UUID
    source_agent_id: uuid.UUID
    source_site: str
    target_site: str
    target_cloud_id: str
    disks: list[dict[str, Any]]
    copy_interval_seconds: int
    state: ItemState
    health: Health
    health_reasons: list[str]
    error: str | None
    paused: bool
    last_committed_seq: int | None
    last_point_source_time: datetime | None
    initial_done_at: datetime | None
    initial_progress: dict[str, Any]
    protected_since: datetime
    rpo_seconds: float | None = None
    ready_for_failover: bool = False
    recovery_agent_id: uuid.UUID | None = Field(
        default=None, description="The recovery host agent that keeps the item's replica."
    )
    replica_seq: int | None = Field(
        default=None, description="Latest point the recovery host holds with the source's roots."
    )
    replica_error: str | None = Field(
        default=None, description="The recovery host's last problem with the replica."
    )


class ItemDetail(ItemOut):
    statistics: dict[str, Any]


class PointOut(BaseModel):
    cycle_seq: int
    kind: str
    point_type: str
    source_time: datetime
    committed_at: datetime
    disks: list[dict[str, Any]]
    changed_blocks: int
    bytes: int


def _ctx(request: Request) -> Context:
    ctx: Context = request.app.state.context
    return ctx


def _out(item: dict[str, Any]) -> dict[str, Any]:
    return {
        **item,
        "rpo_seconds": domain.rpo_seconds(datetime.now(UTC), item["last_point_source_time"]),
        "ready_for_failover": item["initial_done_at"] is not None
        and ItemState(item["state"]) in domain.READY_FOR_FAILOVER,
    }


def _refused(exc: domain.ReplicationError) -> HTTPException:
    status = 404 if "not found" in exc.message else exc.status
    return HTTPException(status, exc.message)


@router.post("", status_code=202, response_model=ItemOut)
async def enable(
    vault_id: uuid.UUID, body: EnableIn, request: Request, who: CurrentPrincipal
) -> Any:
    """Enable replication for a VM: the policy service's prerequisite verdict (409 naming each
    failed check), protected item, initial replication."""
    who.check(Role.OPERATOR, vault_id)
    try:
        item = await until_known(
            lambda: handlers.enable_protection(_ctx(request), vault_id, body.vm_id)
        )
    except domain.ReplicationError as exc:
        raise _refused(exc) from None
    return _out(item)


@router.get("", response_model=list[ItemOut])
async def list_items(
    vault_id: uuid.UUID,
    request: Request,
    who: CurrentPrincipal,
    state: ItemState | None = None,
    health: Health | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Any:
    who.check(Role.READER, vault_id)
    async with _ctx(request).pool.acquire() as conn:
        items = await repo.list_items(
            conn,
            vault_id,
            state.value if state else None,
            health.value if health else None,
            limit,
            offset,
        )
    return [_out(i) for i in items]


async def _item(request: Request, vault_id: uuid.UUID, item_id: uuid.UUID) -> dict[str, Any]:
    async with _ctx(request).pool.acquire() as conn:
        item = await repo.get_item(conn, item_id)
    if item is None or item["vault_id"] != vault_id:
        raise HTTPException(404, f"protected item {item_id} not found")
    return item


@router.get("/{item_id}", response_model=ItemDetail)
async def get_item(
    vault_id: uuid.UUID, item_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    """An item with its state, health, RPO and statistics."""
    who.check(Role.READER, vault_id)
    item = await _item(request, vault_id, item_id)
    async with _ctx(request).pool.acquire() as conn:
        stats = await repo.item_stats(conn, item_id)
    ok = stats.get("cycles_ok", 0) or 0
    statistics = {
        "successful_cycles": ok,
        "failed_cycles": stats.get("cycles_failed", 0),
        "average_latency_seconds": (stats.get("latency_sum_seconds", 0) / ok) if ok else None,
        "max_latency_seconds": stats.get("latency_max_seconds"),
        "average_size_bytes": (stats.get("bytes_sum", 0) / ok) if ok else None,
        "max_size_bytes": stats.get("bytes_max"),
        "network_failures": stats.get("network_failures", 0),
        "app_consistency_failures": stats.get("app_consistency_failures", 0),
    }
    return {**_out(item), "statistics": statistics}


@router.get("/{item_id}/recovery-points", response_model=list[PointOut])
async def recovery_points(
    vault_id: uuid.UUID, item_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    """Retained recovery points, latest first."""
    who.check(Role.READER, vault_id)
    await _item(request, vault_id, item_id)
    async with _ctx(request).pool.acquire() as conn:
        return await repo.live_points(conn, item_id)


@router.post("/{item_id}/recovery-points/{seq}/verify")
async def verify_point(
    vault_id: uuid.UUID, item_id: uuid.UUID, seq: int, request: Request, who: CurrentPrincipal
) -> Any:
    """Re-read every block of the point and recompute its Merkle roots: from the replica
    store, or, without a block copy here, by the recovery host from its replica."""
    who.check(Role.READER, vault_id)
    item = await _item(request, vault_id, item_id)
    async with _ctx(request).pool.acquire() as conn:
        live = {p["cycle_seq"]: p for p in await repo.live_points(conn, item_id)}
    if seq not in live:
        raise HTTPException(404, f"recovery point {seq} not found (pruned or never committed)")
    if not _ctx(request).keeps_blocks(item["recovery_agent_id"]):
        answer = await _from_host(request, item, live[seq], None)
        return {
            "item_id": item_id,
            "seq": seq,
            "ok": bool(answer.get("ok")),
            "verified_by": f"recovery host agent {item['recovery_agent_id']}",
            "disks": [
                {
                    "disk_id": d.get("disk_id"),
                    "expected_root": d.get("expected_root"),
                    "actual_root": d.get("merkle_root"),
                    "ok": bool(d.get("ok")),
                    "sha256": d.get("sha256"),
                }
                for d in answer.get("disks", [])
            ],
        }
    store = _ctx(request).store(item["target_site"])
    try:
        result = await asyncio.to_thread(store.verify_point, str(item_id), seq)
    except UnknownPoint:
        raise HTTPException(404, f"recovery point {seq} was pruned meanwhile") from None
    return result.as_dict()


async def _from_host(
    request: Request, item: dict[str, Any], point: dict[str, Any], target_dir: str | None
) -> dict[str, Any]:
    """The recovery host's verification (or export) of the point, asked once its replica
    holds the point (or after REPLICA_WAIT_SECONDS); its failure as 409, its silence as 504."""
    ctx = _ctx(request)
    wait = min(REPLICA_WAIT_SECONDS, ctx.settings.host_answer_seconds)
    await replica_reaches(ctx, item["item_id"], point["cycle_seq"], wait)
    try:
        return await ask_host(ctx, item, point, target_dir, ctx.settings.host_answer_seconds)
    except HostFailed as exc:
        raise HTTPException(
            409, f"the recovery host keeping the item's replica could not: {exc}"
        ) from None
    except HostSilent as exc:
        raise HTTPException(504, str(exc)) from None


class MaterialiseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_dir: str = Field(min_length=1, max_length=1024)


@router.post("/{item_id}/recovery-points/{seq}/materialise")
async def materialise_point(
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    seq: int,
    body: MaterialiseIn,
    request: Request,
    who: CurrentPrincipal,
) -> Any:
    """Write the point's disk images (byte-identical to the source disks at that cycle) into
    `target_dir`, which must lie under a configured materialise root; without a block copy
    here, the recovery host writes them from its replica into `target_dir`, a folder of its
    own storage."""
    who.check(Role.OPERATOR, vault_id)
    item = await _item(request, vault_id, item_id)
    settings = _ctx(request).settings
    async with _ctx(request).pool.acquire() as conn:
        points = {p["cycle_seq"]: p for p in await repo.live_points(conn, item_id)}
    if seq not in points:
        raise HTTPException(404, f"recovery point {seq} not found (pruned or never committed)")
    disk_ids = [d["disk_id"] for d in points[seq]["disks"]]
    if not _ctx(request).keeps_blocks(item["recovery_agent_id"]):
        try:
            materialise_target(settings, body.target_dir, disk_ids, local=False)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        answer = await _from_host(request, item, points[seq], body.target_dir)
        if not answer.get("ok"):
            raise HTTPException(
                409, f"the recovery host's copy of point {seq} does not verify: {answer}"
            )
        return {
            "item_id": item_id,
            "cycle_seq": seq,
            "written_by": f"recovery host agent {item['recovery_agent_id']}",
            "disks": [
                {
                    "disk_id": d.get("disk_id"),
                    "path": d.get("path"),
                    "sha256": d.get("sha256"),
                    "merkle_root": d.get("merkle_root"),
                    "size_bytes": d.get("size_bytes"),
                }
                for d in answer.get("disks", [])
            ],
        }
    try:
        target = await asyncio.to_thread(materialise_target, settings, body.target_dir, disk_ids)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    store = _ctx(request).store(item["target_site"])
    await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
    disks = []
    for disk in points[seq]["disks"]:
        out = target / f"{disk['disk_id']}.vhdx"
        try:
            digest = await asyncio.to_thread(
                store.materialise, str(item_id), seq, disk["disk_id"], out
            )
        except UnknownPoint:
            raise HTTPException(404, f"recovery point {seq} was pruned meanwhile") from None
        disks.append(
            {
                "disk_id": disk["disk_id"],
                "path": str(out),
                "sha256": digest,
                "merkle_root": disk["merkle_root"],
                "size_bytes": disk["size_bytes"],
            }
        )
    return {"item_id": item_id, "cycle_seq": seq, "disks": disks}


class ImportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(
        default=None,
        max_length=1024,
        description="Folder holding <item_id>/cycle-<seq>.jsonl; default: the policy's "
        "offline import path.",
    )


@router.post("/{item_id}/import")
async def import_offline(
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    body: ImportIn,
    request: Request,
    who: CurrentPrincipal,
) -> Any:
    """Offline initial replication: import the cycle files exported at the source (verified
    exactly like records from Kafka)."""
    who.check(Role.OPERATOR, vault_id)
    item = await _item(request, vault_id, item_id)
    async with _ctx(request).pool.acquire() as conn:
        settings = await rm_repo.policy_settings(conn, item["vault_id"], item["policy_id"])
    base = body.path or settings.get("offline_import_path")
    if not base:
        raise HTTPException(422, "no import path: pass 'path' or set the policy's import path")
    try:
        folder = confined(Path(base) / str(item_id), _ctx(request).settings.allowed_offline_roots())
    except OutsideRoots as exc:
        raise HTTPException(422, f"import path: {exc}") from None
    if not await asyncio.to_thread(folder.is_dir):
        raise HTTPException(404, f"no exported cycles at {folder}")
    lines = await offline.import_cycles(request.app.state.import_pipeline, folder, str(item_id))
    return _out(await _item(request, vault_id, item_id)) | {"imported_records": lines}


async def _action(
    request: Request, vault_id: uuid.UUID, item_id: uuid.UUID, name: str, who: CurrentPrincipal
) -> Any:
    who.check(Role.OPERATOR, vault_id)
    action = {"pause": handlers.pause, "resume": handlers.resume, "resync": handlers.resync}[name]
    try:
        item = await action(_ctx(request), vault_id, item_id)
    except domain.ReplicationError as exc:
        raise _refused(exc) from None
    return _out(item)


@router.post("/{item_id}/pause", response_model=ItemOut)
async def pause(
    vault_id: uuid.UUID, item_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    """Pause replication (the source keeps tracking changes)."""
    return await _action(request, vault_id, item_id, "pause", who)


@router.post("/{item_id}/resume", response_model=ItemOut)
async def resume(
    vault_id: uuid.UUID, item_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    return await _action(request, vault_id, item_id, "resume", who)


@router.post("/{item_id}/resync", response_model=ItemOut)
async def resync(
    vault_id: uuid.UUID, item_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    """Repair: compare block hashes and re-send only what differs."""
    return await _action(request, vault_id, item_id, "resync", who)


@router.delete("/{item_id}", response_model=ItemOut)
async def disable(
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    request: Request,
    who: CurrentPrincipal,
    delete_replica: bool | None = None,
) -> Any:
    """Disable protection; the replica is deleted per policy unless `delete_replica` says."""
    who.check(Role.OPERATOR, vault_id)
    try:
        item = await handlers.disable(_ctx(request), vault_id, item_id, delete_replica)
    except domain.ReplicationError as exc:
        raise _refused(exc) from None
    return _out(item)

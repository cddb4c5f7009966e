"""Routes of protected items: start an operation on one (202 with its job), the items with
their failover state, one item's failover state with its retained points."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from services.failover import item_failover_repository as failover_repo
from services.failover import read_model_repository as read_models
from services.failover.api.common import PREFIX, OperationIn, context, start_operation
from services.failover.commands import StartItemOperation
from services.failover.domain.items import ItemFailoverState
from shared.auth import CurrentPrincipal
from shared.schemas.registration import Role

router = APIRouter(prefix=PREFIX)


@router.post(
    "/failovers/{item_id}/{operation}",
    status_code=202,
    tags=["failover"],
    summary="Start an operation on a protected item (operator): test-failover, "
    "test-failover-cleanup, planned-failover, unplanned-failover, commit, reverse-replicate, "
    "failback. Answers with the job; a running failover cannot be cancelled.",
)
async def item_operation(
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    operation: str,
    request: Request,
    principal: CurrentPrincipal,
    body: OperationIn | None = None,
) -> JSONResponse:
    return await start_operation(
        request,
        principal,
        vault_id,
        operation,
        body,
        lambda op, params, by: StartItemOperation(vault_id, item_id, op, params, by),
    )


@router.get("/failovers", tags=["failover"], summary="Protected items with their failover state")
async def list_items(vault_id: uuid.UUID, request: Request, principal: CurrentPrincipal) -> Any:
    principal.check(Role.READER, vault_id)
    rows = await read_models.items(context(request).pool, vault_id)
    return jsonable_encoder(
        [
            {
                "item_id": r["item_id"],
                "vm_id": r["vm_id"],
                "vm_name": r["vm_name"],
                "replication_state": r["state"],
                "health": r["health"],
                "active": r["active"],
                "failover_state": r["failover_state"] or ItemFailoverState.PROTECTED.value,
                "latest_seq": r["latest_seq"],
            }
            for r in rows
        ]
    )


@router.get("/failovers/{item_id}", tags=["failover"], summary="One item's failover state")
async def show_item(
    vault_id: uuid.UUID, item_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.READER, vault_id)
    pool = context(request).pool
    item = await read_models.item(pool, item_id)
    if item is None or item.vault_id != vault_id:
        raise HTTPException(404, f"protected item {item_id} not found in this vault")
    view = await failover_repo.view(pool, item_id) or {}
    link = await failover_repo.link_of(pool, old=item_id)
    retained = await read_models.retained_points(pool, item_id)
    return jsonable_encoder(
        {
            "item_id": item_id,
            "vm_id": item.vm_id,
            "vm_name": item.vm_name,
            "replication_state": item.state,
            "health": item.health,
            "latest_seq": item.latest_seq,
            "latest_source_time": item.latest_source_time,
            "failover_state": view.get("state", ItemFailoverState.PROTECTED.value),
            "failover": view.get("info", {}),
            "test": view.get("test"),
            "notes": view.get("notes", []),
            "reversed_by": link["new_item_id"] if link else None,
            "retained_points": {
                "count": len(retained.seqs),
                "oldest_seq": min(retained.seqs),
                "latest_seq": max(retained.seqs),
            }
            if retained.seqs
            else None,
        }
    )

"""HTTP routes of the inventory service (read-only): clouds, hosts, VMs, VM networks and sites
of a vault. Every route needs a bearer token with at least the reader role in the vault."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from pydantic import BaseModel

from services.inventory import repository as repo
from shared.auth import CurrentPrincipal
from shared.schemas.inventory import Cloud, Host, Kind, Vm, VmNetwork
from shared.schemas.registration import Role

router = APIRouter(prefix="/v1/vaults/{vault_id}", tags=["inventory"])

Filter = Annotated[str | None, Query(min_length=1, max_length=200)]
RefFilter = Annotated[str | None, Query(min_length=1, max_length=200, description="id or name")]
VmId = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]


class Located(BaseModel):
    site: str
    provider_id: uuid.UUID
    updated_at: datetime


class CloudOut(Cloud, Located):
    pass


class HostOut(Host, Located):
    pass


class VmOut(Vm, Located):
    pass


class NetworkOut(VmNetwork, Located):
    pass


class VmPage(BaseModel):
    items: list[VmOut]
    total: int
    limit: int
    offset: int


class SiteOut(BaseModel):
    provider_id: uuid.UUID
    name: str
    site: str
    last_sequence: int
    last_snapshot_sequence: int | None
    last_snapshot_at: datetime | None
    last_change_at: datetime | None
    stale_ignored: int
    updated_at: datetime
    clouds: int
    hosts: int
    vms: int
    networks: int


def _only(request: Request, *allowed: str) -> None:
    """A misspelt filter must not silently return everything."""
    for name in request.query_params:
        if name not in allowed:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"unknown query parameter '{name}': this route filters by "
                f"{', '.join(allowed) or 'nothing'}",
            )


async def _ids(
    conn: asyncpg.Connection, vault_id: uuid.UUID, kind: Kind, value: str | None
) -> list[str] | None:
    """A cloud/host filter given by id or name -> the matching ids; 400 if none."""
    if value is None:
        return None
    ids = await repo.resolve(conn, vault_id, kind, value)
    if not ids:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"no {kind.value} with id or name '{value}' in this vault: "
            f"list them with GET /v1/vaults/{vault_id}/{kind.value}s",
        )
    return ids


async def _site(conn: asyncpg.Connection, vault_id: uuid.UUID, site: str | None) -> str | None:
    if site is not None and not await repo.site_known(conn, vault_id, site):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"no site '{site}' in this vault: list them with GET /v1/vaults/{vault_id}/sites",
        )
    return site


@router.get("/clouds", response_model=list[CloudOut], summary="VMM clouds")
async def list_clouds(
    vault_id: uuid.UUID, request: Request, who: CurrentPrincipal, site: Filter = None
) -> Any:
    who.check(Role.READER, vault_id)
    _only(request, "site")
    async with request.app.state.pool.acquire() as conn:
        rows, _ = await repo.list_objects(
            conn, vault_id, Kind.CLOUD, site=await _site(conn, vault_id, site)
        )
    return rows


@router.get("/hosts", response_model=list[HostOut], summary="Hyper-V hosts")
async def list_hosts(
    vault_id: uuid.UUID,
    request: Request,
    who: CurrentPrincipal,
    cloud: Annotated[
        str | None, Query(min_length=1, max_length=200, description="id or name")
    ] = None,
    site: Filter = None,
) -> Any:
    who.check(Role.READER, vault_id)
    _only(request, "cloud", "site")
    async with request.app.state.pool.acquire() as conn:
        rows, _ = await repo.list_objects(
            conn,
            vault_id,
            Kind.HOST,
            site=await _site(conn, vault_id, site),
            cloud_ids=await _ids(conn, vault_id, Kind.CLOUD, cloud),
        )
    return rows


@router.get("/vms", response_model=VmPage, summary="Virtual machines, paged")
async def list_vms(
    vault_id: uuid.UUID,
    request: Request,
    who: CurrentPrincipal,
    cloud: Annotated[
        str | None, Query(min_length=1, max_length=200, description="id or name")
    ] = None,
    host: Annotated[
        str | None, Query(min_length=1, max_length=200, description="id or name")
    ] = None,
    site: Filter = None,
    name: Annotated[
        str | None, Query(min_length=1, max_length=200, description="Name contains (any case)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Any:
    who.check(Role.READER, vault_id)
    _only(request, "cloud", "host", "site", "name", "limit", "offset")
    async with request.app.state.pool.acquire() as conn:
        rows, total = await repo.list_objects(
            conn,
            vault_id,
            Kind.VM,
            site=await _site(conn, vault_id, site),
            cloud_ids=await _ids(conn, vault_id, Kind.CLOUD, cloud),
            host_ids=await _ids(conn, vault_id, Kind.HOST, host),
            name_contains=name,
            limit=limit,
            offset=offset,
        )
    return {"items": rows, "total": total, "limit": limit, "offset": offset}


@router.get("/vms/{vm_id}", response_model=VmOut, summary="One virtual machine")
async def get_vm(
    vault_id: uuid.UUID,
    vm_id: Annotated[
        str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    ],
    request: Request,
    who: CurrentPrincipal,
) -> Any:
    who.check(Role.READER, vault_id)
    async with request.app.state.pool.acquire() as conn:
        row = await repo.get_object(conn, vault_id, Kind.VM, vm_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"VM {vm_id} not found in this vault")
    return row


@router.get("/networks", response_model=list[NetworkOut], summary="VM networks")
async def list_networks(
    vault_id: uuid.UUID, request: Request, who: CurrentPrincipal, site: Filter = None
) -> Any:
    who.check(Role.READER, vault_id)
    _only(request, "site")
    async with request.app.state.pool.acquire() as conn:
        rows, _ = await repo.list_objects(
            conn, vault_id, Kind.NETWORK, site=await _site(conn, vault_id, site)
        )
    return rows


@router.get("/sites", response_model=list[SiteOut], summary="Site providers and their discovery")
async def list_sites(vault_id: uuid.UUID, request: Request, who: CurrentPrincipal) -> Any:
    """Each site provider with its last applied sequence, last snapshot and object counts."""
    who.check(Role.READER, vault_id)
    _only(request)
    async with request.app.state.pool.acquire() as conn:
        return await repo.list_sites(conn, vault_id)

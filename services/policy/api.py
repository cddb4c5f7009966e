"""HTTP routes of the policy service: translate requests into handler calls."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.policy import domain, handlers
from shared.auth import CurrentPrincipal
from shared.schemas.policy import (
    Authentication,
    InitialReplication,
    ReplicationPolicySettings,
)
from shared.schemas.registration import Role

router = APIRouter(prefix="/v1/vaults/{vault_id}")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._ -]*$"
OBJECT_ID = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
MAX_BATCH = 500


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyIn(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=NAME_PATTERN)
    settings: ReplicationPolicySettings = Field(default_factory=ReplicationPolicySettings)


class SettingsChanges(Strict):
    """Settings to change; the ones left out keep their value."""

    copy_frequency_seconds: int | None = None
    recovery_points: int | None = None
    app_consistent_frequency_hours: int | None = None
    compression: bool | None = None
    authentication: Authentication | None = None
    port: int | None = None
    initial_replication: InitialReplication | None = None
    initial_replication_start_at: datetime | None = None
    offline_export_path: str | None = Field(default=None, max_length=1024)
    offline_import_path: str | None = Field(default=None, max_length=1024)
    delete_replica_on_disable: bool | None = None
    target_host_os_version: str | None = Field(default=None, max_length=100)


class PolicyUpdateIn(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=100, pattern=NAME_PATTERN)
    settings: SettingsChanges = Field(default_factory=SettingsChanges)


class PolicyOut(BaseModel):
    policy_id: uuid.UUID
    vault_id: uuid.UUID
    name: str
    settings: ReplicationPolicySettings
    version: int
    created_at: datetime
    updated_at: datetime
    pairing_ids: list[uuid.UUID] = Field(default_factory=list)


class PairingIn(Strict):
    source_cloud_id: str = OBJECT_ID
    target_cloud_id: str = OBJECT_ID
    policy: str = Field(min_length=1, max_length=100, description="Policy id or name.")


class PairingOut(BaseModel):
    pairing_id: uuid.UUID
    vault_id: uuid.UUID
    source_cloud_id: str
    source_cloud_name: str | None
    source_site: str
    target_cloud_id: str
    target_cloud_name: str | None
    target_site: str
    policy_id: uuid.UUID
    policy_name: str
    created_at: datetime


class MappingIn(Strict):
    source_network_id: str = OBJECT_ID
    target_network_id: str = OBJECT_ID


class MappingChangeIn(Strict):
    target_network_id: str = OBJECT_ID


class MappingOut(BaseModel):
    mapping_id: uuid.UUID
    vault_id: uuid.UUID
    source_network_id: str
    source_network_name: str | None
    source_site: str
    target_network_id: str
    target_network_name: str | None
    target_site: str
    created_at: datetime
    updated_at: datetime


class CheckOut(BaseModel):
    rule: str
    status: domain.CheckStatus
    message: str


class PrerequisitesOut(BaseModel):
    vm_id: str
    ok: bool
    checks: list[CheckOut]


class PrerequisitesIn(Strict):
    vm_ids: list[Annotated[str, OBJECT_ID]] = Field(min_length=1, max_length=MAX_BATCH)


class PrerequisitesBatchOut(BaseModel):
    ok: bool
    results: list[PrerequisitesOut]


def _refused(exc: domain.PolicyError) -> HTTPException:
    return HTTPException(exc.status, exc.message)


def _pool(request: Request) -> Any:
    return request.app.state.pool


# ------------------------------------------------------------------------------ policies


@router.post("/policies", status_code=201, response_model=PolicyOut, tags=["policies"])
async def create_policy(
    vault_id: uuid.UUID, body: PolicyIn, request: Request, who: CurrentPrincipal
) -> Any:
    """Create a replication policy (admin)."""
    who.check(Role.ADMIN, vault_id)
    try:
        return await handlers.create_policy(_pool(request), vault_id, body.name, body.settings)
    except domain.PolicyError as exc:
        raise _refused(exc) from None


@router.get("/policies", response_model=list[PolicyOut], tags=["policies"])
async def list_policies(vault_id: uuid.UUID, request: Request, who: CurrentPrincipal) -> Any:
    who.check(Role.READER, vault_id)
    return await handlers.list_policies(_pool(request), vault_id)


@router.get("/policies/{policy}", response_model=PolicyOut, tags=["policies"])
async def get_policy(
    vault_id: uuid.UUID, policy: str, request: Request, who: CurrentPrincipal
) -> Any:
    """A policy by id or name, with the pairings that use it."""
    who.check(Role.READER, vault_id)
    try:
        return await handlers.get_policy(_pool(request), vault_id, policy)
    except domain.PolicyError as exc:
        raise _refused(exc) from None


@router.patch("/policies/{policy}", response_model=PolicyOut, tags=["policies"])
async def update_policy(
    vault_id: uuid.UUID,
    policy: str,
    body: PolicyUpdateIn,
    request: Request,
    who: CurrentPrincipal,
) -> Any:
    """Change a policy's settings (admin); protected items of its pairings re-apply it."""
    who.check(Role.ADMIN, vault_id)
    changes = body.settings.model_dump(mode="json", exclude_unset=True)
    try:
        return await handlers.update_policy(
            _pool(request), vault_id, policy, name=body.name, changes=changes
        )
    except domain.PolicyError as exc:
        raise _refused(exc) from None


@router.delete("/policies/{policy}", response_model=PolicyOut, tags=["policies"])
async def delete_policy(
    vault_id: uuid.UUID, policy: str, request: Request, who: CurrentPrincipal
) -> Any:
    """Delete a policy (admin); refused while a cloud pairing uses it."""
    who.check(Role.ADMIN, vault_id)
    try:
        return await handlers.delete_policy(_pool(request), vault_id, policy)
    except domain.PolicyError as exc:
        raise _refused(exc) from None


# ------------------------------------------------------------------------------ pairings


@router.post("/pairings", status_code=201, response_model=PairingOut, tags=["pairings"])
async def create_pairing(
    vault_id: uuid.UUID, body: PairingIn, request: Request, who: CurrentPrincipal
) -> Any:
    """Pair a source cloud with a target cloud under a policy (admin)."""
    who.check(Role.ADMIN, vault_id)
    try:
        return await handlers.create_pairing(
            _pool(request),
            vault_id,
            source_cloud_id=body.source_cloud_id,
            target_cloud_id=body.target_cloud_id,
            policy_ref=body.policy,
        )
    except domain.PolicyError as exc:
        raise _refused(exc) from None


@router.get("/pairings", response_model=list[PairingOut], tags=["pairings"])
async def list_pairings(vault_id: uuid.UUID, request: Request, who: CurrentPrincipal) -> Any:
    who.check(Role.READER, vault_id)
    return await handlers.list_pairings(_pool(request), vault_id)


@router.get("/pairings/{pairing_id}", response_model=PairingOut, tags=["pairings"])
async def get_pairing(
    vault_id: uuid.UUID, pairing_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    who.check(Role.READER, vault_id)
    try:
        return await handlers.get_pairing(_pool(request), vault_id, pairing_id)
    except domain.PolicyError as exc:
        raise _refused(exc) from None


@router.delete("/pairings/{pairing_id}", response_model=PairingOut, tags=["pairings"])
async def remove_pairing(
    vault_id: uuid.UUID, pairing_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    """Unpair (admin); refused while VMs of the source cloud are protected."""
    who.check(Role.ADMIN, vault_id)
    try:
        return await handlers.remove_pairing(_pool(request), vault_id, pairing_id)
    except domain.PolicyError as exc:
        raise _refused(exc) from None


# ------------------------------------------------------------------------------ network mappings


@router.post(
    "/network-mappings", status_code=201, response_model=MappingOut, tags=["network mappings"]
)
async def create_mapping(
    vault_id: uuid.UUID, body: MappingIn, request: Request, who: CurrentPrincipal
) -> Any:
    """Map a source VM network to a target VM network (admin)."""
    who.check(Role.ADMIN, vault_id)
    try:
        return await handlers.create_mapping(
            _pool(request),
            vault_id,
            source_network_id=body.source_network_id,
            target_network_id=body.target_network_id,
        )
    except domain.PolicyError as exc:
        raise _refused(exc) from None


@router.get("/network-mappings", response_model=list[MappingOut], tags=["network mappings"])
async def list_mappings(vault_id: uuid.UUID, request: Request, who: CurrentPrincipal) -> Any:
    who.check(Role.READER, vault_id)
    return await handlers.list_mappings(_pool(request), vault_id)


@router.get("/network-mappings/{mapping_id}", response_model=MappingOut, tags=["network mappings"])
async def get_mapping(
    vault_id: uuid.UUID, mapping_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    who.check(Role.READER, vault_id)
    try:
        return await handlers.get_mapping(_pool(request), vault_id, mapping_id)
    except domain.PolicyError as exc:
        raise _refused(exc) from None


@router.patch(
    "/network-mappings/{mapping_id}", response_model=MappingOut, tags=["network mappings"]
)
async def change_mapping(
    vault_id: uuid.UUID,
    mapping_id: uuid.UUID,
    body: MappingChangeIn,
    request: Request,
    who: CurrentPrincipal,
) -> Any:
    """Point a mapping at another target network (admin)."""
    who.check(Role.ADMIN, vault_id)
    try:
        return await handlers.change_mapping(
            _pool(request), vault_id, mapping_id, body.target_network_id
        )
    except domain.PolicyError as exc:
        raise _refused(exc) from None


@router.delete(
    "/network-mappings/{mapping_id}", response_model=MappingOut, tags=["network mappings"]
)
async def remove_mapping(
    vault_id: uuid.UUID, mapping_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    who.check(Role.ADMIN, vault_id)
    try:
        return await handlers.remove_mapping(_pool(request), vault_id, mapping_id)
    except domain.PolicyError as exc:
        raise _refused(exc) from None


# ------------------------------------------------------------------------------ prerequisites


@router.get("/prerequisites", response_model=PrerequisitesOut, tags=["prerequisites"])
async def prerequisites(
    vault_id: uuid.UUID,
    request: Request,
    who: CurrentPrincipal,
    vm_id: Annotated[str, Query(min_length=1, max_length=100)],
) -> Any:
    """Enable-replication prerequisite checks of one VM (operator)."""
    who.check(Role.OPERATOR, vault_id)
    return (await handlers.check_many(_pool(request), vault_id, [vm_id]))[0]


@router.post("/prerequisites", response_model=PrerequisitesBatchOut, tags=["prerequisites"])
async def prerequisites_batch(
    vault_id: uuid.UUID, body: PrerequisitesIn, request: Request, who: CurrentPrincipal
) -> Any:
    """Enable-replication prerequisite checks of several VMs at once (operator)."""
    who.check(Role.OPERATOR, vault_id)
    results = await handlers.check_many(_pool(request), vault_id, body.vm_ids)
    return {"ok": all(r["ok"] for r in results), "results": results}

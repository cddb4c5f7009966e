"""The commands of the failover service (imperative: what an operator or the service asks for),
each handled by the handler of its type (services/failover/handlers.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from services.failover.domain.jobs import Operation
from services.failover.domain.plans import PlanGroup
from services.failover.job import JobParams


@dataclass(frozen=True)
class StartItemOperation:
    vault_id: uuid.UUID
    item_id: uuid.UUID
    operation: Operation
    params: JobParams
    by: str


@dataclass(frozen=True)
class StartPlanOperation:
    vault_id: uuid.UUID
    plan_ref: str
    operation: Operation
    params: JobParams
    by: str


@dataclass(frozen=True)
class ApproveAction:
    vault_id: uuid.UUID
    job_id: uuid.UUID
    action_id: str
    by: str
    comment: str = ""


@dataclass(frozen=True)
class RestartJob:
    vault_id: uuid.UUID
    job_id: uuid.UUID
    by: str


@dataclass(frozen=True)
class CreatePlan:
    vault_id: uuid.UUID
    name: str
    description: str
    groups: list[PlanGroup]


@dataclass(frozen=True)
class ReplacePlan:
    vault_id: uuid.UUID
    plan_id: uuid.UUID
    name: str
    description: str
    groups: list[PlanGroup]


@dataclass(frozen=True)
class DeletePlan:
    vault_id: uuid.UUID
    plan_ref: str


Command = (
    StartItemOperation
    | StartPlanOperation
    | ApproveAction
    | RestartJob
    | CreatePlan
    | ReplacePlan
    | DeletePlan
)

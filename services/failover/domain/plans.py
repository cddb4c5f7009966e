"""Recovery plans: groups run in order (the items of a group in parallel) with pre- and
post-actions; the plan's limits and the actions that run in a run of a kind."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.schemas.failover import FailoverKind

MAX_PLAN_ITEMS = 100
MAX_PLAN_GROUPS = 7
SCRIPT_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]*$"


class PlanAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex[:8],
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
    )
    name: str = Field(min_length=1, max_length=200)
    kind: str = Field(pattern=r"^(script|manual)$")
    script: str | None = Field(
        default=None,
        max_length=255,
        pattern=SCRIPT_NAME,
        description="The script's file name in the failover service's scripts folder "
        "(`DR_FAILOVER_SCRIPTS_DIR`): a name, never a path.",
    )
    args: list[str] = Field(default_factory=list, max_length=50)
    timeout_seconds: float | None = Field(default=None, gt=0, le=24 * 3600)
    instructions: str = Field(default="", max_length=4000)
    run_on: list[FailoverKind] = Field(
        default_factory=lambda: list(FailoverKind),
        description="Limit the action to test, planned and/or unplanned runs.",
    )

    @field_validator("script")
    @classmethod
    def _name_only(cls, value: str | None) -> str | None:
        if value is not None and ".." in value:
            raise ValueError("a script is named by its file name: '..' is not allowed")
        return value

    @field_validator("args")
    @classmethod
    def _short_args(cls, value: list[str]) -> list[str]:
        if any(len(a) > 1024 or "\x00" in a for a in value):
            raise ValueError("a script argument has at most 1024 characters and no NUL")
        return value


class PlanGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[uuid.UUID] = Field(default_factory=list)
    pre_actions: list[PlanAction] = Field(default_factory=list, max_length=20)
    post_actions: list[PlanAction] = Field(default_factory=list, max_length=20)


@dataclass(frozen=True)
class RecoveryPlan:
    plan_id: uuid.UUID
    vault_id: uuid.UUID
    name: str
    description: str
    groups: list[PlanGroup]
    created_at: datetime
    updated_at: datetime

    @property
    def item_count(self) -> int:
        return sum(len(g.items) for g in self.groups)


def plan_problems(groups: Sequence[PlanGroup]) -> list[str]:
    """Why a recovery plan is invalid (empty: valid)."""
    problems = []
    if not groups:
        problems.append("a recovery plan needs at least one group")
    if len(groups) > MAX_PLAN_GROUPS:
        problems.append(
            f"a recovery plan has at most {MAX_PLAN_GROUPS} groups; this one has {len(groups)}"
        )
    items = [i for g in groups for i in g.items]
    if len(items) > MAX_PLAN_ITEMS:
        problems.append(
            f"a recovery plan has at most {MAX_PLAN_ITEMS} protected items; this one has "
            f"{len(items)}"
        )
    dupes = sorted({str(i) for i in items if items.count(i) > 1})
    if dupes:
        problems.append(f"an item can be in only one group of a plan: {', '.join(dupes[:5])}")
    ids = [a.action_id for g in groups for a in (*g.pre_actions, *g.post_actions)]
    if len(ids) != len(set(ids)):
        problems.append("action ids must be unique within a plan")
    for g_no, group in enumerate(groups, 1):
        for action in (*group.pre_actions, *group.post_actions):
            if action.kind == "script" and not action.script:
                problems.append(f"group {g_no}: script action '{action.name}' needs a script")
    return problems


def actions_for(actions: Iterable[PlanAction], kind: FailoverKind | None) -> list[PlanAction]:
    """The actions that run in a run of `kind` (none for cleanup, commit, reverse)."""
    if kind is None:
        return []
    return [a for a in actions if kind in a.run_on]

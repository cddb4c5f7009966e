"""Recovery points: the point a failover asks for, whether it is still retained, the
data-loss window and planned failover's zero-data-loss proof."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from services.failover.domain.errors import FailoverRefused, InvalidRequest, NotFound
from services.failover.domain.items import ItemRow
from shared.schemas.failover import PointChoice


@dataclass(frozen=True)
class PointRequest:
    choice: PointChoice
    cycle_seq: int | None


def point_request(choice: PointChoice, cycle_seq: int | None) -> PointRequest:
    if choice is PointChoice.CHOSEN and cycle_seq is None:
        raise InvalidRequest("choose a recovery point: pass cycle_seq")
    return PointRequest(choice, cycle_seq if choice is PointChoice.CHOSEN else None)


class PointNotRetained(FailoverRefused):
    """The chosen recovery point was taken but retention has removed it."""


@dataclass(frozen=True)
class RetainedPoints:
    """The cycles of an item's retained recovery points (and which are app-consistent); empty
    when none are known (points taken before they were listed)."""

    seqs: frozenset[int] = frozenset()
    app_seqs: frozenset[int] = frozenset()

    def describe(self) -> str:
        if not self.seqs:
            return "none"
        n = len(self.seqs)
        return f"{min(self.seqs)}..{max(self.seqs)} ({n} point{'s' if n != 1 else ''})"


def check_point_exists(
    item: ItemRow,
    choice: str | None,
    cycle_seq: int | None,
    retained: RetainedPoints | None = None,
) -> None:
    """The point a test or unplanned failover asks for exists, checked when the job is asked
    for (not when its materialise step runs): a chosen cycle past the item's latest point is
    NotFound, one that retention removed PointNotRetained (naming the retained range), a
    latest app-consistent point where none was taken a refusal."""
    choice = choice or PointChoice.LATEST.value
    latest = item.latest_seq
    if choice == PointChoice.CHOSEN.value and latest is not None and cycle_seq is not None:
        seq = cycle_seq
        if seq > latest:
            raise NotFound(
                f"{item.vm_name} has no recovery point {seq}: its latest is {latest}; "
                "list the retained points (GET .../protected-items/{item_id}/recovery-points) "
                "and choose one of them"
            )
        if retained is not None and retained.seqs and seq not in retained.seqs:
            raise PointNotRetained(
                f"{item.vm_name} has no retained recovery point {seq}: the retained points "
                f"are {retained.describe()}; list them (GET "
                ".../protected-items/{item_id}/recovery-points) and choose one of them"
            )
    app_pruned = retained is not None and bool(retained.seqs) and not retained.app_seqs
    if choice == PointChoice.LATEST_APP_CONSISTENT.value and (
        item.latest_app_seq is None or app_pruned
    ):
        raise FailoverRefused(
            f"{item.vm_name} has no app-consistent recovery point yet: choose latest or a "
            "chosen point, or wait for the policy's app-consistent snapshot"
        )


def data_loss_seconds(failover_at: datetime, source_time: datetime) -> float:
    """The data-loss window: what the source did after the point used is lost."""
    return max(0.0, (failover_at - source_time).total_seconds())


def zero_data_loss(
    materialised: Mapping[str, str], final_roots: Mapping[str, str]
) -> tuple[bool, str]:
    """Planned failover's proof: every materialised disk's Merkle root equals the root the
    source agent computed after its final cycle."""
    if not final_roots:
        return False, "the source agent reported no final roots"
    bad = [
        f"{disk}: replica {materialised.get(disk, 'missing')[:12]} != source {root[:12]}"
        for disk, root in sorted(final_roots.items())
        if materialised.get(disk) != root
    ]
    if set(materialised) - set(final_roots):
        bad.append(f"disks without a source root: {sorted(set(materialised) - set(final_roots))}")
    return (not bad), "; ".join(bad)

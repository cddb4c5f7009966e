"""An item's replication phase: the moves `PHASE_TRANSITIONS` allows, and `item.json` files
written with the older flags read as the phase they meant."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from services.host_agent.item_record import (
    PHASE_TRANSITIONS,
    IllegalTransition,
    ItemRecord,
    ReplicationPhase,
)
from shared.schemas.replication import Compression

P = ReplicationPhase


def record(**fields: Any) -> ItemRecord:
    base: dict[str, Any] = {
        "item_id": str(uuid.uuid4()),
        "vm_id": "vm-1",
        "vm_name": "web01",
        "disks": [],
        "copy_interval_seconds": 30,
        "compression": Compression.ZLIB.value,
        "next_seq": 1,
    }
    return ItemRecord.model_validate({**base, **fields})


def test_a_new_item_starts_initial_and_a_full_cycle_makes_it_replicate() -> None:
    r = record()
    assert r.phase is P.INITIAL and not r.journaling
    r.move_to(P.REPLICATING)
    assert r.journaling


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (P.INITIAL, P.SYNCED),  # a final cycle needs a full copy first
        (P.RESYNC_REQUIRED, P.SYNCED),  # ... and a journal
        (P.REPLICATING, P.INITIAL),  # nothing goes back to before its first copy
        (P.SYNCED, P.INITIAL),
    ],
)
def test_moves_the_table_does_not_list_are_refused(start: P, target: P) -> None:
    r = record(phase=start.value)
    with pytest.raises(IllegalTransition):
        r.move_to(target)
    assert r.phase is start


def test_every_phase_can_fault_and_every_phase_can_be_resynced() -> None:
    for phase in P:
        assert P.RESYNC_REQUIRED in PHASE_TRANSITIONS[phase]
        assert P.REPLICATING in PHASE_TRANSITIONS[phase]


@pytest.mark.parametrize(
    ("flags", "phase"),
    [
        ({"initial_done": False, "needs_resync": False, "final_shipped": False}, P.INITIAL),
        ({"initial_done": True, "needs_resync": False, "final_shipped": False}, P.REPLICATING),
        ({"initial_done": True, "needs_resync": True, "final_shipped": False}, P.RESYNC_REQUIRED),
        ({"initial_done": False, "needs_resync": True, "final_shipped": False}, P.RESYNC_REQUIRED),
        ({"initial_done": True, "needs_resync": False, "final_shipped": True}, P.SYNCED),
    ],
)
def test_an_item_file_with_the_older_flags_reads_as_its_phase(
    flags: dict[str, bool], phase: P
) -> None:
    r = record(**flags, paused=True)
    assert r.phase is phase and r.paused
    assert ItemRecord.model_validate_json(r.model_dump_json()).phase is phase

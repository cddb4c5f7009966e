"""Rows the failover service reads, built for unit tests (no database)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

from services.failover.domain.items import ItemRow
from services.failover.domain.jobs import TaskRow


def item_row(**over: Any) -> ItemRow:
    """A replicating protected item `web01` with recovery points up to 9; `over` changes any
    field."""
    row = ItemRow(
        item_id=uuid.uuid4(),
        vault_id=uuid.uuid4(),
        vm_id="vm-web01",
        vm_name="web01",
        source_cloud_id="c-primary",
        target_cloud_id="c-recovery",
        pairing_id=uuid.uuid4(),
        source_agent_id=uuid.uuid4(),
        state="replicating",
        health="Normal",
        active=True,
        latest_seq=9,
        latest_source_time=None,
        latest_app_seq=None,
    )
    return dataclasses.replace(row, **over)


def task_row(**over: Any) -> TaskRow:
    """A step of a job, running; `over` changes any field."""
    row = TaskRow(
        job_id=uuid.uuid4(),
        task_no=0,
        step_key="prepare",
        name="prepare",
        state="in_progress",
        command_id=uuid.uuid4(),
        attempts=1,
        started_at=datetime(2026, 1, 2, tzinfo=UTC),
        ended_at=None,
        error=None,
        cause=None,
        recommendation=None,
        detail={},
    )
    return dataclasses.replace(row, **over)

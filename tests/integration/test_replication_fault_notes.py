"""What the replication service notes about an item (a storage failure, a dead-lettered delta
record) is kept in its PostgreSQL: another process on the same database (the service after a
restart, or a second instance) shows it in the item's health and error, and a stored cycle
clears it. Real PostgreSQL."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest

from kit.stack import migrated_pool
from services.replication import domain
from services.replication import repository as repo
from services.replication.__main__ import MIGRATIONS
from services.replication.config import ReplicationSettings
from services.replication.context import Context
from services.replication.health import evaluate_health
from shared import db

pytestmark = pytest.mark.integration

FULL = OSError(errno.ENOSPC, "No space left on device")
BROKEN = domain.storage_fault(OSError(errno.EIO, "Input/output error")) or ""


async def test_a_storage_failure_noted_by_one_process_shows_in_the_next(
    database_url: str, tmp_path: Path
) -> None:
    settings = ReplicationSettings(DR_REPLICATION_STORE_DIR=str(tmp_path))
    async with migrated_pool(database_url, "notes", MIGRATIONS) as pool:
        schema = await pool.fetchval("SELECT current_schema()")
        item_id = uuid.uuid4()
        async with pool.acquire() as conn:
            await repo.insert_item(
                conn,
                item_id=item_id,
                vault_id=uuid.uuid4(),
                vm_id="vm-1",
                vm_name="db01",
                pairing_id=uuid.uuid4(),
                policy_id=uuid.uuid4(),
                source_agent_id=uuid.uuid4(),
                source_site="primary",
                target_site="recovery",
                target_cloud_id="cloud-r",
                disks=[],
                copy_interval_seconds=30,
                state="replicating",
            )
        first = Context(pool=pool, settings=settings)
        with pytest.raises(OSError):
            async with first.storing(item_id):
                raise FULL
        with pytest.raises(OSError):  # not a storage failure: nothing noted for it
            async with first.storing(item_id):
                raise OSError(errno.ENOENT, "No such file or directory")

        # the service restarted (or another instance): a process with nothing in memory
        later_pool = await db.create_pool(database_url, schema)
        try:
            later = Context(pool=later_pool, settings=settings)
            async with later_pool.acquire() as conn:
                await repo.note_dead_letter(conn, item_id, "a record was dead-lettered")
                assert await repo.fault_notes(conn, item_id) == domain.FaultNotes(
                    storage_fault=domain.storage_fault(FULL),
                    dead_letter="a record was dead-lettered",
                )
                assert not await repo.note_storage_fault(conn, item_id, BROKEN)  # not new
            await evaluate_health(later)
            async with later_pool.acquire() as conn:
                shown = await repo.get_item(conn, item_id)
            assert shown is not None
            assert shown["health"] == "Critical", shown
            assert shown["error"] == BROKEN and "I/O error" in BROKEN, shown
            assert "a record was dead-lettered" in shown["health_reasons"], shown

            await later.recovered(item_id)  # a cycle of it was stored
            await evaluate_health(later)
            async with later_pool.acquire() as conn:
                assert await repo.fault_notes(conn, item_id) == domain.FaultNotes()
                cleared = await repo.get_item(conn, item_id)
            assert cleared is not None
            assert cleared["error"] is None and cleared["health"] != "Critical", cleared
            assert "a record was dead-lettered" not in cleared["health_reasons"], cleared
        finally:
            await later_pool.close()

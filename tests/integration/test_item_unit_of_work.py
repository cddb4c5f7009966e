"""The protected item's unit of work against the real PostgreSQL: what an item's methods
changed is saved as one UPDATE of those columns, with its events in the outbox, in the
caller's transaction; a rolled-back transaction keeps neither; leaving the block without
commit() is refused."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from kit.stack import migrated_pool
from services.replication import repository as repo
from services.replication.__main__ import MIGRATIONS
from services.replication.unit_of_work import ItemUnitOfWork, UncommittedChanges
from shared.schemas.replication import ItemState

pytestmark = pytest.mark.integration


async def _new_item(conn: asyncpg.Connection) -> uuid.UUID:
    item_id = uuid.uuid4()
    await repo.insert_item(
        conn,
        item_id=item_id,
        vault_id=uuid.uuid4(),
        vm_id=f"vm-{item_id}",
        vm_name="db01",
        pairing_id=uuid.uuid4(),
        policy_id=uuid.uuid4(),
        source_agent_id=uuid.uuid4(),
        source_site="primary",
        target_site="recovery",
        target_cloud_id="cloud-r",
        disks=[{"disk_id": "d0", "path": "/vms/db01/d0.img", "size_bytes": 1 << 20}],
        copy_interval_seconds=30,
        state="replicating",
        last_committed_seq=3,
    )
    return item_id


async def _outbox(conn: asyncpg.Connection, key: str | None = None) -> list[str]:
    rows = await conn.fetch(
        "SELECT event_type FROM outbox WHERE $1::text IS NULL OR key = $1 ORDER BY id", key
    )
    return [r["event_type"] for r in rows]


async def test_commit_saves_the_changed_columns_and_the_events_together(
    database_url: str,
) -> None:
    async with migrated_pool(database_url, "uow", MIGRATIONS) as pool, pool.acquire() as conn:
        item_id = await _new_item(conn)
        async with conn.transaction(), ItemUnitOfWork(conn) as uow:
            item = await uow.load(item_id)
            assert item is not None and item.disks[0].path == "/vms/db01/d0.img"
            item.pause()
            await uow.commit()
        saved = await repo.load_item(conn, item_id, lock=False)
        assert saved is not None
        assert saved.state is ItemState.SUSPENDED and saved.paused
        assert saved.last_committed_seq == 3 and saved.disks == item.disks  # untouched
        assert await _outbox(conn, str(item_id)) == ["ItemStateChanged"]
        assert await _outbox(conn, str(item.source_agent_id)) == ["ReplicationPauseRequested"]

        # a transaction that rolls back keeps neither the row's change nor the events
        before = await _outbox(conn)
        with pytest.raises(RuntimeError, match="boom"):
            async with conn.transaction(), ItemUnitOfWork(conn) as uow:
                item = await uow.load(item_id)
                assert item is not None
                item.resume()
                await uow.commit()
                raise RuntimeError("boom")
        again = await repo.load_item(conn, item_id, lock=False)
        assert again is not None and again.state is ItemState.SUSPENDED
        assert await _outbox(conn) == before


async def test_leaving_without_commit_is_refused(database_url: str) -> None:
    async with migrated_pool(database_url, "uow", MIGRATIONS) as pool, pool.acquire() as conn:
        item_id = await _new_item(conn)
        with pytest.raises(UncommittedChanges, match=str(item_id)):
            async with conn.transaction(), ItemUnitOfWork(conn) as uow:
                item = await uow.load(item_id)
                assert item is not None
                item.pause()
        with pytest.raises(RuntimeError, match="inside the caller's transaction"):
            async with ItemUnitOfWork(conn):
                pass
        unchanged = await repo.load_item(conn, item_id, lock=False)
        assert unchanged is not None and unchanged.state is ItemState.REPLICATING

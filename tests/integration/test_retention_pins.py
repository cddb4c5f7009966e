"""Retention keeps a point an unanswered materialise request needs, in the replica store and in
the index, and prunes it on the first pass after the request is answered: the point a worker
chose (`latest` when it was chosen) and the one a request names, whether the request is
pending or handed to the recovery host; a request older than anyone waits for pins nothing.
Real PostgreSQL and a real replica store."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import asyncpg
import pytest

from kit.stack import migrated_pool
from services.replication import repository as repo
from services.replication import request_repository as request_repo
from services.replication.__main__ import MIGRATIONS
from services.replication.config import ReplicationSettings
from services.replication.context import Context
from services.replication.materialise import choose_and_pin, record_answer
from services.replication.pruning import apply_retention
from shared.schemas import failover as fo
from tests.support.store_worker import SourceDisk, stage_cycle

pytestmark = pytest.mark.integration

SITE = "recovery"


async def new_item(pool: asyncpg.Pool) -> tuple[uuid.UUID, uuid.UUID]:
    item_id, vault_id = uuid.uuid4(), uuid.uuid4()
    async with pool.acquire() as conn:
        await repo.insert_item(
            conn,
            item_id=item_id,
            vault_id=vault_id,
            vm_id=f"vm-{item_id}",
            vm_name="pin01",
            pairing_id=uuid.uuid4(),
            policy_id=uuid.uuid4(),
            source_agent_id=uuid.uuid4(),
            source_site="primary",
            target_site=SITE,
            target_cloud_id="cloud-r",
            disks=[],
            copy_interval_seconds=1,
            state="replicating",
        )
    return item_id, vault_id


async def commit(ctx: Context, item_id: uuid.UUID, disk: SourceDisk, seq: int) -> None:
    """Cycle `seq` of `disk`: stored in the replica store, then indexed, as a cycle commits."""
    disk.write_random(0.2)
    manifest = stage_cycle(ctx.store(SITE), str(item_id), seq, [disk])
    ctx.store(SITE).commit_point(str(item_id), manifest)
    async with ctx.pool.acquire() as conn:
        await repo.insert_point(
            conn,
            item_id=item_id,
            cycle_seq=seq,
            kind=manifest.kind,
            point_type="crash_consistent",
            source_time=manifest.source_time,
            disks=[
                {"disk_id": d.disk_id, "size_bytes": d.size_bytes, "merkle_root": d.merkle_root}
                for d in manifest.disks
            ],
            changed_blocks=1,
            bytes=1,
        )


async def ask(
    ctx: Context, item_id: uuid.UUID, vault_id: uuid.UUID, tmp_path: Path, **choice: object
) -> fo.RecoveryPointMaterialiseRequested:
    msg = fo.RecoveryPointMaterialiseRequested.model_validate(
        {"request_id": uuid.uuid4(), "item_id": item_id, "target_dir": str(tmp_path), **choice}
    )
    async with ctx.pool.acquire() as conn:
        assert await request_repo.insert_request(
            conn,
            request_id=msg.request_id,
            kind="materialise",
            vault_id=vault_id,
            item_id=item_id,
            request=msg.model_dump(mode="json"),
        )
    return msg


async def retained(ctx: Context, item_id: uuid.UUID) -> tuple[list[int], list[int]]:
    """The item's live points in the index and in the replica store."""
    async with ctx.pool.acquire() as conn:
        index = sorted(p["cycle_seq"] for p in await repo.live_points(conn, item_id))
    return index, [p.seq for p in ctx.store(SITE).points(str(item_id))]


async def answer(ctx: Context, msg: fo.RecoveryPointMaterialiseRequested) -> None:
    async with ctx.pool.acquire() as conn:
        request = await request_repo.get_request(conn, msg.request_id)
    assert request is not None
    await record_answer(
        ctx,
        request,
        fo.RecoveryPointMaterialiseFailed(
            request_id=msg.request_id, item_id=msg.item_id, error="the test answers"
        ),
    )


async def test_points_requests_wait_for_are_kept_until_answered(
    database_url: str, tmp_path: Path
) -> None:
    settings = ReplicationSettings(store_dir=tmp_path / "store", keep_recent_points=2)
    async with migrated_pool(database_url, "pins", MIGRATIONS) as pool:
        ctx = Context(pool=pool, settings=settings)
        item_id, vault_id = await new_item(pool)
        disk = SourceDisk("d0", 16 * 4096, 4096, random.Random(7))
        shas = {}
        for seq in range(1, 5):
            await commit(ctx, item_id, disk, seq)
            shas[seq] = disk.sha256()
        # the worker chose `latest` (4) for one request; another names point 2; a third, from
        # two hours ago, names point 1 and pins nothing (nobody waits for its answer)
        latest = await ask(ctx, item_id, vault_id, tmp_path / "a")
        chosen = await choose_and_pin(ctx, latest, vault_id)
        assert not isinstance(chosen, str), chosen
        assert chosen[1]["cycle_seq"] == 4
        named = await ask(ctx, item_id, vault_id, tmp_path / "b", choice="chosen", cycle_seq=2)
        stale = await ask(ctx, item_id, vault_id, tmp_path / "c", choice="chosen", cycle_seq=1)
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE failover_requests SET created_at = now() - interval '2 hours'"
                " WHERE request_id = $1",
                stale.request_id,
            )
            # the first request handed to the recovery host: still unanswered
            assert await request_repo.delegate_request(conn, latest.request_id)
        for seq in range(5, 9):
            await commit(ctx, item_id, disk, seq)

        assert await apply_retention(ctx) == 4  # 1, 3, 5, 6: not 2 and 4, though past recent
        assert await retained(ctx, item_id) == ([2, 4, 7, 8], [2, 4, 7, 8])
        for seq in (2, 4):  # still whole in the store, as the requests need them
            out = tmp_path / f"out-{seq}.img"
            assert ctx.store(SITE).materialise(str(item_id), seq, "d0", out) == shas[seq]
        assert await apply_retention(ctx) == 0  # stable while the requests wait

        await answer(ctx, named)
        assert await apply_retention(ctx) == 1
        assert await retained(ctx, item_id) == ([4, 7, 8], [4, 7, 8])
        await answer(ctx, latest)  # the host's answer came (a failure: the same to retention)
        assert await apply_retention(ctx) == 1
        assert await retained(ctx, item_id) == ([7, 8], [7, 8])
        await answer(ctx, stale)
        assert await apply_retention(ctx) == 0

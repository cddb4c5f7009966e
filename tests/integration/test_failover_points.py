"""The failover service's recovery-point read model on the real PostgreSQL: points enter with
RecoveryPointCreated and leave with RecoveryPointsPruned (through the service's own event
handlers), and a failover naming a point that retention removed is refused when it is asked
for, with the retained range, as a 409 JSON error."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from fastapi import HTTPException

from kit.stack import migrated_pool
from services.failover import handlers
from services.failover.__main__ import MIGRATIONS
from services.failover.api.common import refused
from services.failover.commands import StartItemOperation
from services.failover.config import FailoverSettings
from services.failover.domain.errors import FailoverRefused, NotFound
from services.failover.domain.jobs import Operation
from services.failover.domain.points import PointNotRetained
from services.failover.event_handlers import make_event_handlers
from services.failover.job import JobParams
from services.failover.unit_of_work import PgReadModels
from services.failover.workflow import Engine, Notifier
from shared.kafka.decode import Incoming
from shared.schemas import replication
from shared.schemas.envelope import EventPayload, new_envelope
from shared.schemas.registry import type_name_of

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with migrated_pool(database_url, "failover", MIGRATIONS) as p:
        yield p


async def apply(pool: asyncpg.Pool, vault_id: uuid.UUID, payload: EventPayload) -> None:
    """Hand `payload` to the failover service's handler of its type, as the consumer does."""
    handler = make_event_handlers(Notifier())[type_name_of(type(payload))[0]]
    env = new_envelope(payload, vault_id=vault_id, producer_id="service:replication")
    inc = Incoming(env, payload, "replication-events", 0, 0, str(getattr(payload, "item_id", "")))
    async with pool.acquire() as conn, conn.transaction():
        await handler(conn, inc)


def point(item_id: uuid.UUID, seq: int, app: bool = False) -> replication.RecoveryPointCreated:
    return replication.RecoveryPointCreated(
        item_id=item_id,
        vm_id="vm-web01",
        cycle_seq=seq,
        kind=replication.CycleKind.DELTA,
        point_type=replication.RecoveryPointType.APP_CONSISTENT
        if app
        else replication.RecoveryPointType.CRASH_CONSISTENT,
        source_time=T0 + timedelta(minutes=seq),
        disks=[replication.DiskRoot(disk_id="d0", size_bytes=4096, merkle_root="a" * 64)],
        changed_blocks=1,
        bytes_stored=4096,
    )


async def test_a_pruned_point_is_refused_at_the_door_with_the_retained_range(
    pool: asyncpg.Pool,
) -> None:
    vault_id, item_id = uuid.uuid4(), uuid.uuid4()
    await apply(
        pool,
        vault_id,
        replication.ProtectionEnabled(
            item_id=item_id,
            vm_id="vm-web01",
            vm_name="web01",
            source_cloud_id="c-primary",
            target_cloud_id="c-recovery",
            pairing_id=uuid.uuid4(),
            policy_id=uuid.uuid4(),
            source_agent_id=uuid.uuid4(),
        ),
    )
    for seq in range(1, 6):
        await apply(pool, vault_id, point(item_id, seq, app=seq == 1))
    await apply(
        pool, vault_id, replication.RecoveryPointsPruned(item_id=item_id, cycle_seqs=[1, 2])
    )

    engine = Engine(pool, FailoverSettings(poll_seconds=0.05), {})
    ctx = handlers.Context(pool=pool, settings=engine.settings, engine=engine, notifier=Notifier())

    def asking(seq: int, operation: Operation = Operation.TEST_FAILOVER) -> StartItemOperation:
        params = JobParams(choice="chosen", cycle_seq=seq, network="none")
        return StartItemOperation(vault_id, item_id, operation, params, "op")

    for operation in (Operation.TEST_FAILOVER, Operation.UNPLANNED_FAILOVER):
        with pytest.raises(PointNotRetained) as pruned:
            await handlers.start_item_operation(ctx, asking(2, operation))
        assert "no retained recovery point 2" in pruned.value.message
        assert "3..5 (3 points)" in pruned.value.message
        http = refused(pruned.value)
        assert isinstance(http, HTTPException) and http.status_code == 409
        assert "3..5" in str(http.detail)
    with pytest.raises(NotFound, match="latest is 5"):
        await handlers.start_item_operation(ctx, asking(6))
    # the only app-consistent point was pruned: "latest app-consistent" has nothing to use
    app = JobParams(choice="latest_app_consistent", network="none")
    with pytest.raises(FailoverRefused, match="no app-consistent recovery point"):
        await handlers.start_item_operation(
            ctx, StartItemOperation(vault_id, item_id, Operation.TEST_FAILOVER, app, "op")
        )

    # a retained point passes the door's checks
    async with pool.acquire() as conn:
        item = await handlers.check_item(
            PgReadModels(conn), vault_id, item_id, Operation.TEST_FAILOVER, asking(3).params
        )
    assert item.latest_seq == 5
    await engine.stop()

"""What every replication handler works with: the service's dependencies (`Context`: the
pool, settings, one replica store per recovery site) and `emit`, an event or agent command
into the outbox in the caller's transaction (a protected item's own changes and events are
saved by the unit of work: services/replication/unit_of_work.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg

from services.replication import domain
from services.replication import repository as repo
from services.replication.config import ReplicationSettings
from services.replication.feed import FeedWriter
from services.replication.store import ReplicaStore, check_hashes
from shared import outbox
from shared.kafka.ranges import RangeReader
from shared.runtime import DependencyWatch
from shared.schemas.envelope import EventPayload

log = logging.getLogger(__name__)

PRODUCER_ID = "service:replication"


@dataclass
class Context:
    pool: asyncpg.Pool
    settings: ReplicationSettings
    stores: dict[str, ReplicaStore] = field(default_factory=dict)
    failover_wake: asyncio.Event = field(default_factory=asyncio.Event)  # a request to work on
    # BlocksShipped event id -> (site, index -> bytes) whose blocks `make_delta_prepare` already
    # verified and made durable in that site's store (the group being handled; then cleared)
    prestored: dict[uuid.UUID, tuple[str, dict[int, bytes]]] = field(default_factory=dict)
    store_bytes_at: float = float("-inf")  # when `dr_replica_store_bytes` was last measured
    delta_partitions: int | None = None  # of replication.deltas, to check records' partitions
    # this process's view of Kafka, named as the cause in late items' health
    broker: DependencyWatch | None = None
    # forwards verified batches to the recovery hosts' replica feeds (None: not fed)
    feed: FeedWriter | None = None
    # reads a cycle's records again from the delta topic (a cycle this process did not forward
    # whole to the recovery host's feed: it took the partition over mid-cycle)
    delta_reader: RangeReader | None = None

    @contextlib.asynccontextmanager
    async def storing(self, item_id: uuid.UUID) -> AsyncIterator[None]:
        """Around a replica-store write for `item_id`: a storage failure is noted for the
        item's health (and re-raised: the record is retried, nothing is skipped). The note
        is written on a connection of its own: the record's transaction rolls back."""
        try:
            yield
        except OSError as exc:
            fault = domain.storage_fault(exc)
            if fault is not None:
                async with self.pool.acquire() as conn:
                    if await repo.note_storage_fault(conn, item_id, fault):
                        log.error(
                            "replica storage failure",
                            extra={"item_id": str(item_id), "error": str(exc)},
                        )
            raise

    async def recovered(self, item_id: uuid.UUID) -> None:
        """A cycle of `item_id` was stored: what was noted about it no longer holds. On a
        connection of its own too, so that the record's transaction never holds the note's
        row while a later failure of it notes again."""
        async with self.pool.acquire() as conn:
            await repo.clear_fault_notes(conn, item_id)

    def keeps_blocks(self, recovery_agent_id: uuid.UUID | None) -> bool:
        """Whether this service stores an item's blocks in its replica store: for an item no
        recovery host keeps a replica of (one reverse-replicated to its old primary site), and
        for every item while `keep_block_copy` is on. Else the item is verified from hashes
        (services/replication/leaves.py) and its blocks only pass through, forwarded to the
        host's feed."""
        return recovery_agent_id is None or self.feed is None or self.settings.keep_block_copy

    def put_blocks(
        self,
        site: str,
        item_id: uuid.UUID,
        recovery_agent_id: uuid.UUID | None,
        blocks: list[tuple[int | None, str, bytes]],
    ) -> None:
        """Each block's bytes checked against its SHA-256 (BlockHashMismatch), and made
        durable in the site's store if this service keeps the item's blocks. Blocking: call
        it in a thread."""
        if self.keeps_blocks(recovery_agent_id):
            self.store(site).put_blocks(str(item_id), blocks)
        else:
            check_hashes(blocks)

    def store(self, site: str) -> ReplicaStore:
        if site not in self.stores:
            self.stores[site] = ReplicaStore(self.settings.store_dir / site)
        return self.stores[site]


async def emit(
    conn: asyncpg.Connection, vault_id: uuid.UUID, payload: EventPayload, key: str
) -> None:
    await outbox.emit(conn, payload, vault_id=vault_id, key=key, producer_id=PRODUCER_ID)

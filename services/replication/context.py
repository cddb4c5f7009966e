"""What every replication handler works with: the service's dependencies (`Context`: the
pool, settings, one replica store per recovery site) and the writes shared by the handlers:
an event or an agent command into the outbox, and an item's state change with its
`ItemStateChanged`, in the caller's transaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from services.replication import domain
from services.replication import repository as repo
from services.replication.config import ReplicationSettings
from services.replication.feed import FeedWriter
from services.replication.store import ReplicaStore
from shared import outbox
from shared.runtime import DependencyWatch
from shared.schemas import replication as ev
from shared.schemas.envelope import EventPayload
from shared.schemas.replication import Health, ItemState

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

    def store(self, site: str) -> ReplicaStore:
        if site not in self.stores:
            self.stores[site] = ReplicaStore(self.settings.store_dir / site)
        return self.stores[site]


async def emit(
    conn: asyncpg.Connection, vault_id: uuid.UUID, payload: EventPayload, key: str
) -> None:
    await outbox.emit(conn, payload, vault_id=vault_id, key=key, producer_id=PRODUCER_ID)


async def command(conn: asyncpg.Connection, item: dict[str, Any], payload: EventPayload) -> None:
    await emit(conn, item["vault_id"], payload, str(item["source_agent_id"]))


async def change_state(
    conn: asyncpg.Connection,
    item: dict[str, Any],
    state: ItemState,
    *,
    reason: str = "",
    health: Health | None = None,
    **fields: Any,
) -> None:
    previous = ItemState(item["state"])
    new_health = health or Health(item["health"])
    await repo.update_item(
        conn, item["item_id"], state=state.value, health=new_health.value, **fields
    )
    if previous is not state or Health(item["health"]) is not new_health:
        await emit(
            conn,
            item["vault_id"],
            ev.ItemStateChanged(
                item_id=item["item_id"],
                vm_id=item["vm_id"],
                state=state,
                previous_state=previous,
                health=new_health,
                reason=reason,
            ),
            str(item["item_id"]),
        )
    item.update(state=state.value, health=new_health.value, **fields)

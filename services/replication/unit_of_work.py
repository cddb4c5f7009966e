"""The unit of work of the replication service's handlers: it loads protected items
(services/replication/item.py) on the caller's connection, locked, and `commit()` saves each
one's changed columns (one UPDATE) and the events and agent commands it recorded (the outbox),
in the caller's transaction. A handler is then: load, call the item's methods, commit.

It opens no transaction of its own: a Kafka handler runs in the consumer's transaction (the
inbox row, the effects and the outbox commit together) and an operator's command opens one
around it. Leaving the block normally with changes not committed is a bug and raises; leaving
it on an exception drops them (the caller's transaction rolls back)."""

from __future__ import annotations

import uuid
from types import TracebackType
from typing import Self

import asyncpg

from services.replication import repository as repo
from services.replication.context import emit
from services.replication.item import ProtectedItem


class UncommittedChanges(RuntimeError):
    """A unit of work ended without saving what its items changed or recorded."""


class ItemUnitOfWork:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.items: dict[uuid.UUID, ProtectedItem] = {}

    async def __aenter__(self) -> Self:
        if not self.conn.is_in_transaction():
            raise RuntimeError("an item unit of work runs inside the caller's transaction")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        unsaved = [str(i) for i, item in self.items.items() if item.changed or item.pending]
        if exc_type is None and unsaved:
            raise UncommittedChanges(
                "protected items changed without commit(): " + ", ".join(unsaved)
            )

    async def load(self, item_id: uuid.UUID, *, lock: bool = True) -> ProtectedItem | None:
        """The item (locked until the transaction ends), or None if there is none; an item
        loaded already is the same object, with what it changed so far."""
        if item_id in self.items:
            return self.items[item_id]
        item = await repo.load_item(self.conn, item_id, lock=lock)
        if item is not None:
            self.items[item_id] = item
        return item

    async def commit(self) -> None:
        """Save every loaded item: its changed columns, then its recorded events in order."""
        for item in self.items.values():
            await repo.save_item(self.conn, item)
            for pending in item.pending:
                await emit(self.conn, item.vault_id, pending.payload, pending.key)
            item.pending.clear()

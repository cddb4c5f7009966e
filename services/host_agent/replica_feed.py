"""Feeding the recovery-site replica: a `ReplicaPointApplyRequested` names a verified cycle's
records on `replication.deltas.v1` (partition and offset range); the agent reads that range,
stages the blocks of the item's cycle (each checked against its SHA-256) and applies the point
(services/host_agent/replica.py), then answers with the roots it holds. The delta records are
produced once, by the source agent; nothing re-sends the blocks.

Records of other items and cycles in the range are skipped. A repeated command finds the point
applied and answers the same roots; a replica that is not at the point before (it missed
points) answers a failure saying so.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from services.host_agent.replica import DiskState, Point, ReplicaError, SiteReplica
from services.host_agent.replicator import CommandFailed
from shared import topics
from shared.delta_blocks import decode_data
from shared.kafka import RangeUnavailable, Rejected, decode_event, read_range
from shared.merkle import block_length
from shared.schemas.agent import ReplicaPointApplyRequested
from shared.schemas.replication import BlocksShipped

log = logging.getLogger(__name__)


class ReplicaFeed:
    def __init__(self, replica: SiteReplica, bootstrap: str, prefix: str) -> None:
        self.replica = replica
        self.bootstrap = bootstrap
        self.topic = topics.physical(topics.REPLICATION_DELTAS, prefix)

    def _answer(self, command: ReplicaPointApplyRequested) -> dict[str, Any]:
        item = str(command.item_id)
        return {
            "item_id": item,
            "cycle_seq": self.replica.head(item).seq,
            "roots": self.replica.roots(item),
        }

    async def apply(self, command: ReplicaPointApplyRequested) -> dict[str, Any]:
        item, seq = str(command.item_id), command.cycle_seq
        head = await asyncio.to_thread(self.replica.head, item)
        if head.seq >= seq:
            return await asyncio.to_thread(self._answer, command)
        if head.seq != seq - 1:
            raise CommandFailed(
                f"the replica of item {item} is at point {head.seq}: point {seq} cannot follow "
                "(points between were missed; the replica needs a resync)"
            )
        geometry = {d.disk_id: d for d in command.disks}
        staged = 0
        try:
            async for records in read_range(
                self.bootstrap,
                self.topic,
                command.partition,
                command.first_offset,
                command.last_offset,
            ):
                blocks = []
                for record in records:
                    if record.key != item.encode():
                        continue
                    try:
                        _, msg = decode_event(record.value)
                    except Rejected:
                        continue  # the pipeline dead-lettered it
                    if not isinstance(msg, BlocksShipped) or msg.cycle_seq != seq:
                        continue
                    disk = geometry.get(msg.disk_id)
                    if disk is None:
                        continue
                    for block in msg.blocks:
                        length = block_length(block.index, disk.size_bytes, disk.block_size)
                        data = (
                            bytes(max(length, 0))
                            if block.data is None
                            else decode_data(block, msg.compression)
                        )
                        blocks.append((msg.disk_id, block.index, bytes.fromhex(block.sha256), data))
                staged += await asyncio.to_thread(self.replica.stage_blocks, item, seq, blocks)
        except RangeUnavailable as exc:
            raise CommandFailed(f"point {seq} of item {item}: {exc}") from None
        point = Point(
            seq,
            tuple(
                DiskState(d.disk_id, d.size_bytes, d.block_size, d.merkle_root)
                for d in command.disks
            ),
        )
        try:
            await asyncio.to_thread(self.replica.stage_point, item, point)
            await asyncio.to_thread(self.replica.apply, item, seq)
            await asyncio.to_thread(self.replica.prune, item, command.keep_from)
        except ReplicaError as exc:
            raise CommandFailed(f"point {seq} of item {item}: {exc}") from None
        log.info("replica point applied", extra={"item_id": item, "seq": seq, "blocks": staged})
        return await asyncio.to_thread(self._answer, command)

    async def delete(self, item_id: uuid.UUID) -> dict[str, Any]:
        """Forget the item's replica (its images and journal); idempotent."""
        await asyncio.to_thread(self.replica.delete_item, str(item_id))
        log.info("replica deleted", extra={"item_id": str(item_id)})
        return {"item_id": str(item_id), "deleted": True}

"""Feeding the recovery-site replica: a `ReplicaPointApplyRequested` names a verified cycle's
records on this agent's replica feed (`replica.feed.v1.<agent id>`, partition and offset
range), where the replication service forwarded them as the source agent signed them; the
agent reads that range, stages the blocks of the item's cycle (each checked against its
SHA-256) and applies the point (services/host_agent/replica.py), then answers with the roots
it holds. The agent reads nothing else of the data plane: its principal may read its own feed
only, never the delta topic with every vault's blocks.

Records of other items and cycles in the range are skipped. A repeated command finds the point
applied and answers the same roots; a replica that is not at the point before (it missed
points) answers a failure saying so.

A reverse-replicated item's replica starts on the old primary host from the images the VM ran
on there (`ReplicaSeedRequested`): copied into the replica, their leaf hashes reported
(`ReplicaLeavesReported`) so the service asks the new source for the blocks that differ only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from services.host_agent import differencing, replica_export
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_format import DiskState, Point, ReplicaError
from services.host_agent.replica_seed import SeedDisk
from services.host_agent.wiring import CommandFailed, Emit
from shared import topics
from shared.delta_blocks import decode_data
from shared.files import OutsideRoots, confined, fsync_dir
from shared.kafka.decode import RawRecord, Rejected, decode_event
from shared.kafka.ranges import RangeReader, RangeUnavailable
from shared.kafka.security import KafkaSecurity
from shared.merkle import block_count, block_length
from shared.schemas.agent import (
    LEAVES_PER_REPORT,
    DifferencingDisksRequested,
    ReplicaDisk,
    ReplicaHandoverRequested,
    ReplicaLeavesReported,
    ReplicaLeavesRequested,
    ReplicaPointApplyRequested,
    ReplicaPointExportRequested,
    ReplicaSeedRequested,
)
from shared.schemas.replication import BlocksShipped

log = logging.getLogger(__name__)


class ReplicaFeed:
    def __init__(
        self,
        replica: SiteReplica,
        bootstrap: str,
        prefix: str,
        storage: Path,
        security: KafkaSecurity | None = None,
        *,
        agent_id: str,
    ) -> None:
        """`security`: how the ranges are read (the agent's principal; default from the
        environment), all through one consumer (started at the first point, stopped by
        `close()`); `agent_id`: whose replica feed they are read from."""
        self.replica = replica
        self.reader = RangeReader(bootstrap, security=security)
        self.topic = topics.physical(topics.replica_feed(agent_id), prefix)
        self.storage = storage

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
        base = seq - 1 if command.follows is None else command.follows
        if head.seq != base:
            raise CommandFailed(
                f"the replica of item {item} is at point {head.seq}: point {seq} cannot follow "
                f"(it follows point {base}; the replica catches up by a resync)",
                # behind: the service has it catch up (ReplicaLeavesRequested)
                {"replica_seq": head.seq, "cycle_seq": seq} if head.seq < base else {},
            )
        geometry = {d.disk_id: d for d in command.disks}
        staged = 0
        if (
            command.partition is not None
            and command.first_offset is not None
            and command.last_offset is not None
        ):
            try:
                ranges = self.reader.read(
                    self.topic, command.partition, command.first_offset, command.last_offset
                )
                async with contextlib.aclosing(ranges) as batches:
                    async for records in batches:
                        staged += await asyncio.to_thread(self._stage, item, seq, geometry, records)
            except RangeUnavailable as exc:
                # its blocks gone from the feed (retention): the replica missed the point
                gone = {"replica_seq": head.seq, "cycle_seq": seq} if "is gone" in str(exc) else {}
                raise CommandFailed(f"point {seq} of item {item}: {exc}", gone) from None
        point = Point(seq, tuple(_disk_state(d) for d in command.disks))
        try:
            await asyncio.to_thread(self.replica.stage_point, item, point)
            await asyncio.to_thread(self.replica.apply, item, seq, command.follows)
            await asyncio.to_thread(self.replica.prune, item, command.keep_from)
        except ReplicaError as exc:
            raise CommandFailed(f"point {seq} of item {item}: {exc}") from None
        log.info("replica point applied", extra={"item_id": item, "seq": seq, "blocks": staged})
        return await asyncio.to_thread(self._answer, command)

    def _stage(
        self, item: str, seq: int, geometry: dict[str, ReplicaDisk], records: list[RawRecord]
    ) -> int:
        """Decode (base64, zlib) and stage a fetch's blocks of the cycle: in a worker thread,
        off the event loop."""
        return self.replica.stage_blocks(item, seq, _blocks_of(records, item, seq, geometry))

    async def close(self) -> None:
        """Stop the consumer the ranges are read through."""
        await self.reader.close()

    async def delete(self, item_id: uuid.UUID) -> dict[str, Any]:
        """Forget the item's replica (its images and journal); idempotent."""
        await asyncio.to_thread(self.replica.delete_item, str(item_id))
        log.info("replica deleted", extra={"item_id": str(item_id)})
        return {"item_id": str(item_id), "deleted": True}

    async def seed(self, command: ReplicaSeedRequested, emit: Emit) -> dict[str, Any]:
        """Reverse replication: the item's replica started from image files in this host's
        storage (`SiteReplica.seed`: copied block by block, crash-safe, idempotent), then every
        disk's leaves reported (`ReplicaLeavesReported`, through `emit`, before the answer)."""
        item, seq = str(command.item_id), command.cycle_seq
        disks = await self._seed_disks(command)
        try:
            point = await asyncio.to_thread(
                self.replica.seed, item, seq, str(command.request_id), disks
            )
        except ReplicaError as exc:
            raise CommandFailed(f"seeding point {seq} of item {item}: {exc}") from None
        log.info("replica seeded", extra={"item_id": item, "seq": seq, "disks": len(disks)})
        await self._report_leaves(command, point, emit)
        return {
            "item_id": item,
            "request_id": str(command.request_id),
            "cycle_seq": seq,
            "roots": point.roots(),
        }

    async def report_seeded_again(self, command: ReplicaSeedRequested, emit: Emit) -> None:
        """A repeated seed command (answered already): its leaves again, if the replica is
        still at the seeded point (nothing is copied here)."""
        with contextlib.suppress(CommandFailed):
            disks = await self._seed_disks(command)
            args = (str(command.item_id), command.cycle_seq, str(command.request_id), disks)
            point = await asyncio.to_thread(self.replica.seeded, *args)
            if point is not None:
                await self._report_leaves(command, point, emit)

    async def _seed_disks(self, command: ReplicaSeedRequested) -> list[SeedDisk]:
        disks = []
        for d in command.disks:
            try:
                path = await asyncio.to_thread(confined, d.path, [self.storage])
            except OutsideRoots as exc:
                raise CommandFailed(
                    f"disk {d.disk_id}: {exc}: images are read from this host's storage only"
                ) from None
            disks.append(SeedDisk(d.disk_id, path, d.size_bytes, d.block_size))
        return disks

    async def report_leaves(self, command: ReplicaLeavesRequested, emit: Emit) -> dict[str, Any]:
        """A replica that missed points: the leaves of HEAD reported (`ReplicaLeavesReported`),
        then HEAD's point answered. Idempotent (HEAD as it is now)."""
        item = str(command.item_id)
        head = await asyncio.to_thread(self.replica.head, item)
        if not head.seq:
            raise CommandFailed(f"no replica of item {item} here")
        await self._report_leaves(command, head, emit)
        return {
            "item_id": item,
            "request_id": str(command.request_id),
            "cycle_seq": head.seq,
            "roots": head.roots(),
        }

    async def _report_leaves(
        self, command: ReplicaSeedRequested | ReplicaLeavesRequested, point: Point, emit: Emit
    ) -> None:
        """Every disk's leaf hashes, disk by disk, `LEAVES_PER_REPORT` a report (one report's
        hashes read at a time)."""
        item = str(command.item_id)
        for disk in point.disks:
            blocks = block_count(disk.size_bytes, disk.block_size)
            chunks = -(-blocks // LEAVES_PER_REPORT)
            for chunk_no in range(chunks):
                first = chunk_no * LEAVES_PER_REPORT
                try:
                    raw = await asyncio.to_thread(
                        self.replica.leaves, item, disk.disk_id, first, LEAVES_PER_REPORT
                    )
                except ReplicaError as exc:
                    raise CommandFailed(f"leaves of item {item}: {exc}") from None
                await emit(
                    ReplicaLeavesReported(
                        item_id=command.item_id,
                        request_id=command.request_id,
                        cycle_seq=point.seq,
                        disk_id=disk.disk_id,
                        disk_count=len(point.disks),
                        size_bytes=disk.size_bytes,
                        block_size=disk.block_size,
                        chunk_no=chunk_no,
                        chunks=chunks,
                        first_index=first,
                        leaf_hashes=base64.b64encode(raw).decode(),
                    )
                )

    async def _target(self, target_dir: str) -> Path:
        target = await asyncio.to_thread(Path(target_dir).resolve)
        storage = await asyncio.to_thread(self.storage.resolve)
        if not target.is_relative_to(storage) or target == storage:
            raise CommandFailed(f"{target} is not a folder in this host's storage {storage}")
        return target

    async def differencing(self, command: DifferencingDisksRequested) -> dict[str, Any]:
        """A test failover: differencing disks over a frozen view of the point (see
        services/host_agent/differencing.py); the replica goes on. Idempotent."""
        target = await self._target(command.target_dir)
        item, seq = str(command.item_id), command.cycle_seq
        disks = [_disk_state(d) for d in command.disks]
        view = differencing.view_id_of(command.request_id)
        if not await asyncio.to_thread(self.replica.files(item).head.exists):
            raise CommandFailed(f"this host keeps no replica of item {item}")
        if await asyncio.to_thread((target / "vm.json").exists):
            vm_disks = await asyncio.to_thread(lambda: {p.name for p in target.iterdir()})
            if not {f"{d.disk_id}{differencing.SUFFIX}" for d in disks} <= vm_disks:
                raise CommandFailed(f"{target} holds another VM (vm.json)")
        try:
            paths = await asyncio.to_thread(
                differencing.create, self.replica, item, seq, view, target, disks
            )
        except ReplicaError as exc:
            raise CommandFailed(f"point {seq} of item {item}: {exc}") from None
        log.info(
            "differencing disks created over the replica",
            extra={"item_id": item, "seq": seq, "view": view, "to": str(target)},
        )
        return self._disks_result(command, paths)

    async def export(self, command: ReplicaPointExportRequested) -> dict[str, Any]:
        """Verify or export a retained point (services/host_agent/replica_export.py): each
        disk read through a frozen view, its root recomputed and its SHA-256 taken, written to
        `target_dir/<disk_id>.vhdx` if given. Idempotent."""
        item, seq = str(command.item_id), command.cycle_seq
        target = None
        if command.target_dir is not None:
            target = await self._target(command.target_dir)
            bad = replica_export.unusable_disk_ids([d.disk_id for d in command.disks])
            if bad:
                raise CommandFailed(f"disk ids unusable as file names: {bad}")
            if await asyncio.to_thread((target / "vm.json").exists):
                raise CommandFailed(f"{target} holds a VM (vm.json): its disks are not overwritten")
        expected = {d.disk_id: d.merkle_root for d in command.disks}
        view = replica_export.view_id_of(command.request_id)
        try:
            checks = await asyncio.to_thread(
                replica_export.check_point, self.replica, item, seq, view, expected, target
            )
        except ReplicaError as exc:
            raise CommandFailed(f"point {seq} of item {item}: {exc}") from None
        ok = all(c.ok for c in checks)
        log.info(
            "replica point exported" if target else "replica point verified",
            extra={"item_id": item, "seq": seq, "ok": ok, "to": str(target) if target else None},
        )
        return {
            "item_id": item,
            "request_id": str(command.request_id),
            "cycle_seq": seq,
            "ok": ok,
            "disks": [c.to_json() for c in checks],
        }

    @staticmethod
    def _disks_result(
        command: DifferencingDisksRequested | ReplicaHandoverRequested, paths: dict[str, Path]
    ) -> dict[str, Any]:
        return {
            "request_id": str(command.request_id),
            "item_id": str(command.item_id),
            "cycle_seq": command.cycle_seq,
            "disks": [
                {"disk_id": d.disk_id, "path": str(paths[d.disk_id]), "size_bytes": d.size_bytes}
                for d in command.disks
            ],
        }

    async def handover(self, command: ReplicaHandoverRequested) -> dict[str, Any]:
        """A failover: the replica brought to the point (rolled back if older) and its images
        renamed into the VM's folder; the replica is then gone. Re-run after a kill, it finds
        the images moved (or moves the rest)."""
        target = await self._target(command.target_dir)
        await asyncio.to_thread(self._hand_over, command, target)
        log.info(
            "replica handed over",
            extra={"item_id": str(command.item_id), "seq": command.cycle_seq, "to": str(target)},
        )
        return self._disks_result(
            command, {d.disk_id: target / f"{d.disk_id}.vhdx" for d in command.disks}
        )

    def _hand_over(self, command: ReplicaHandoverRequested, target: Path) -> None:
        item, seq = str(command.item_id), command.cycle_seq
        outs = {d.disk_id: target / f"{d.disk_id}.vhdx" for d in command.disks}
        if not self.replica.files(item).head.exists():
            if all(out.exists() for out in outs.values()):
                return  # handed over already (a repeated command after a kill)
            raise CommandFailed(f"this host keeps no replica of item {item}")
        try:
            tests = self.replica.views(item)
            if tests:
                raise CommandFailed(
                    f"test failover disks run over this replica (views of points "
                    f"{sorted(tests.values())}): it is not handed over while they exist"
                )
            head = self.replica.head(item)
            if head.seq < seq:
                raise CommandFailed(f"the replica is at point {head.seq}, not yet at {seq}")
            if head.seq > seq:
                self.replica.rollback(item, seq)  # only the blocks changed since
            expected = {d.disk_id: d.merkle_root for d in command.disks}
            held = self.replica.roots(item)
            if held != expected:
                raise CommandFailed(f"the replica's roots at point {seq} are not the source's")
        except ReplicaError as exc:
            raise CommandFailed(f"point {seq} of item {item}: {exc}") from None
        if (target / "vm.json").exists():
            raise CommandFailed(f"{target} holds a VM (vm.json): its disks are not replaced")
        target.mkdir(parents=True, exist_ok=True)
        for disk_id, out in outs.items():
            image = self.replica.image_path(item, disk_id)
            if image.exists():
                os.replace(image, out)  # OSError (EXDEV: another filesystem) -> a copy instead
        fsync_dir(target)
        self.replica.delete_item(item)


def _disk_state(disk: ReplicaDisk) -> DiskState:
    return DiskState(disk.disk_id, disk.size_bytes, disk.block_size, disk.merkle_root)


def _blocks_of(
    records: list[RawRecord], item: str, seq: int, geometry: dict[str, ReplicaDisk]
) -> list[tuple[str, int, bytes, bytes]]:
    """The blocks of the item's cycle in `records` (disk, index, SHA-256, data); records of
    other items or cycles, of disks not in `geometry` and undecodable ones are skipped."""
    blocks: list[tuple[str, int, bytes, bytes]] = []
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
        batch = []
        try:
            for block in msg.blocks:
                length = block_length(block.index, disk.size_bytes, disk.block_size)
                data = (
                    bytes(max(length, 0))
                    if block.data is None
                    else decode_data(block, msg.compression, length)
                )
                batch.append((msg.disk_id, block.index, bytes.fromhex(block.sha256), data))
        except ValueError:
            continue  # undecodable or longer than the block: the pipeline refused it
        blocks.extend(batch)
    return blocks

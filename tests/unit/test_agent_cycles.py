"""Cycles: batching stays within the limits, the shipped blocks turn the previous image into
the current one with the declared roots, a resync sends only what differs, offline export."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any

from services.host_agent.cycles import FileSink, signer_for
from services.host_agent.item_record import ItemRecord, ReplicationPhase
from services.host_agent.item_replicator import ItemReplicator
from services.host_agent.tracking import HostIO
from services.host_agent.vms import create_vm, disk_path
from services.host_agent.wiring import Wiring
from services.host_agent.workload import Pattern, Writer, write_blocks
from shared import signing
from shared.delta_blocks import encode_block
from shared.edge_identity import Identity
from shared.merkle import BLOCK_SIZE, disk_root, disk_tree
from shared.schemas.agent import DiskSpec, InitialReplication, ResyncRequested
from shared.schemas.envelope import Envelope, EventPayload
from shared.schemas.registration import ProducerKind
from shared.schemas.replication import MAX_BLOCKS_PER_BATCH, Compression, CycleKind

IDENTITY = Identity(
    producer_id=uuid.uuid4(),
    vault_id=uuid.uuid4(),
    kind=ProducerKind.AGENT,
    name="hv-1",
    site="primary",
    generation=1,
    credential="drc_unit-test",
    private_key=signing.private_key_hex(signing.new_private_key()),
)


class Harness:
    """A VM with two disks, one protected item, cycles written to files (the offline sink)."""

    def __init__(self, tmp: Path, compression: Compression = Compression.ZLIB) -> None:
        self.storage = tmp / "storage"
        self.out = tmp / "cycles"
        self.vm = create_vm(self.storage, "web01", [3 * 2**20, 2**20 + 4096])
        self.paths = [disk_path(self.storage, self.vm, d) for d in self.vm.disks]
        self.host = HostIO()
        self.events: list[EventPayload] = []
        sign = signer_for(IDENTITY)

        async def emit(payload: EventPayload) -> None:
            self.events.append(payload)

        self.wiring = Wiring(
            sign=sign,
            emit=emit,
            sink=lambda item, seq: FileSink(sign, self.out / f"{seq}.jsonl"),
        )
        self.record = ItemRecord(
            item_id=uuid.uuid4(),
            vm_id=self.vm.id,
            vm_name=self.vm.name,
            disks=[
                DiskSpec(disk_id=d.id, path=str(p), size_bytes=d.size_bytes)
                for d, p in zip(self.vm.disks, self.paths, strict=True)
            ],
            copy_interval_seconds=1,
            compression=compression,
            next_seq=1,
        )
        self.folder = tmp / "state" / str(self.record.item_id)
        self.folder.mkdir(parents=True)
        self.item = self.new_item()

    def new_item(self) -> ItemReplicator:
        record = (
            ItemRecord.model_validate_json((self.folder / "item.json").read_text())
            if (self.folder / "item.json").exists()
            else self.record
        )
        return ItemReplicator(self.folder, record, self.host, self.wiring)

    def write(self, blocks: int, pattern: Pattern = Pattern.RANDOM) -> None:
        write_blocks(self.host, Writer(self.storage, self.vm, pattern), blocks)

    def cycle(self, seq: int) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.out / f"{seq}.jsonl").read_text().splitlines()]


def apply(cycle: list[dict[str, Any]], images: dict[str, Path]) -> dict[str, Any]:
    """Apply a cycle's blocks to image copies; returns the CycleCompleted payload."""
    assert cycle[0]["type"] == "CycleStarted" and cycle[-1]["type"] == "CycleCompleted"
    for env in cycle[1:-1]:
        batch = env["payload"]
        with images[batch["disk_id"]].open("r+b") as fh:
            for block in batch["blocks"]:
                if block["zero"]:
                    size = images[batch["disk_id"]].stat().st_size
                    data = bytes(min(BLOCK_SIZE, size - block["index"] * BLOCK_SIZE))
                else:
                    data = base64.b64decode(block["data"])
                    compressed = block.get("compressed")
                    if compressed is None:
                        compressed = batch["compression"] == "zlib"
                    if compressed:
                        data = zlib.decompress(data)
                assert hashlib.sha256(data).hexdigest() == block["sha256"]
                fh.seek(block["index"] * BLOCK_SIZE)
                fh.write(data)
    done: dict[str, Any] = cycle[-1]["payload"]
    assert done["batches"] == len(cycle) - 2
    assert done["blocks"] == sum(len(e["payload"]["blocks"]) for e in cycle[1:-1])
    return done


def test_a_batch_of_incompressible_blocks_stays_far_below_one_mebibyte(tmp_path: Path) -> None:
    from shared.delta_blocks import Batcher

    for compression in Compression:
        batcher = Batcher(uuid.uuid4(), 1, compression)
        sign = signer_for(IDENTITY)
        batches = []
        for index in range(200):
            data = bytes(BLOCK_SIZE) if index % 5 == 0 else os.urandom(BLOCK_SIZE)
            out = batcher.add("disk0", encode_block(index, data, compression))
            if out is not None:
                batches.append(out)
        last = batcher.flush()
        assert last is not None
        batches.append(last)
        assert sum(len(b.blocks) for b in batches) == 200
        for batch in batches:
            assert len(batch.blocks) <= MAX_BLOCKS_PER_BATCH
            assert len(sign(batch).to_bytes()) < 800 * 1024
    zeros = Batcher(uuid.uuid4(), 1, Compression.NONE)
    outs = [zeros.add("d", encode_block(i, bytes(BLOCK_SIZE), Compression.NONE)) for i in range(65)]
    assert [len(o.blocks) for o in outs if o] == [64]  # zero blocks cost no data


async def test_cycles_turn_the_previous_image_into_the_current_one(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.write(30)  # before protection: the initial cycle carries it
    await h.item.open()
    await h.item.ship_cycle(CycleKind.INITIAL)
    replica = {}
    for spec in h.record.disks:
        replica[spec.disk_id] = tmp_path / f"replica-{spec.disk_id}"
        replica[spec.disk_id].write_bytes(b"")
        os.truncate(replica[spec.disk_id], spec.size_bytes)
    done = apply(h.cycle(1), replica)
    assert done["kind"] == "initial"
    for root in done["disks"]:
        assert root["merkle_root"] == disk_root(replica[root["disk_id"]])
    for seq in (2, 3, 4):
        h.write(25 if seq != 3 else 0, Pattern.SEQUENTIAL if seq == 4 else Pattern.RANDOM)
        before = {d: p.read_bytes() for d, p in replica.items()}
        await h.item.ship_cycle(CycleKind.DELTA)
        done = apply(h.cycle(seq), replica)
        for spec, path in zip(h.record.disks, h.paths, strict=True):
            assert replica[spec.disk_id].read_bytes() == path.read_bytes()
            assert {r["disk_id"]: r["merkle_root"] for r in done["disks"]}[
                spec.disk_id
            ] == disk_root(path)
        changed = sum(
            before[d][i : i + BLOCK_SIZE] != replica[d].read_bytes()[i : i + BLOCK_SIZE]
            for d in replica
            for i in range(0, replica[d].stat().st_size, BLOCK_SIZE)
        )
        assert changed <= done["blocks"] <= 25
        if seq == 3:
            assert done["blocks"] == 0 and done["batches"] == 0  # empty cycles still ship
    assert h.item.record.next_seq == 5
    progress = [e for e in h.events if type(e).__name__ == "InitialReplicationProgressed"]
    assert progress and progress[-1].blocks_done == progress[-1].blocks_total  # type: ignore[attr-defined]

    # A clean restart reloads the shipped leaves; an image changed outside: scan mode.
    await h.item.close()
    with h.paths[1].open("r+b") as fh:
        fh.seek(3 * BLOCK_SIZE)
        fh.write(b"outside the agent")
    h.item = h.new_item()
    await h.item.open()
    assert h.item.disks[0].tree.root() == disk_tree(h.paths[0]).root()
    await h.item.ship_cycle(CycleKind.DELTA)
    done = apply(h.cycle(5), replica)
    assert done["blocks"] == 1
    assert replica[h.record.disks[1].disk_id].read_bytes() == h.paths[1].read_bytes()
    await h.item.close()


async def test_resync_sends_only_the_blocks_that_differ(tmp_path: Path) -> None:
    h = Harness(tmp_path, Compression.NONE)
    await h.item.open()
    h.write(40)
    await h.item.ship_cycle(CycleKind.INITIAL)
    replica = {}
    for spec, path in zip(h.record.disks, h.paths, strict=True):
        replica[spec.disk_id] = tmp_path / f"replica-{spec.disk_id}"
        shutil.copy(path, replica[spec.disk_id])
    # The source moves on; the replica is also missing its last block of disk 1 (shorter).
    h.write(7)
    short = h.record.disks[1]
    os.truncate(replica[short.disk_id], short.size_bytes - 4096)
    resync_id = uuid.uuid4()
    for spec in h.record.disks:
        leaves = b"".join(disk_tree(replica[spec.disk_id]).leaf_hashes())
        ok = h.item.record.item_id
        command = ResyncRequested(
            command_id=uuid.uuid4(),
            agent_id=IDENTITY.producer_id,
            item_id=ok,
            resync_id=resync_id,
            cycle_seq=9,
            disk_id=spec.disk_id,
            disk_count=2,
            size_bytes=replica[spec.disk_id].stat().st_size,
            chunk_no=0,
            chunks=1,
            first_index=0,
            leaf_hashes=base64.b64encode(leaves).decode(),
        )
        from services.host_agent.resync_chunks import store_resync_chunk

        complete = store_resync_chunk(h.folder, command)
    assert complete
    await h.item.resync(command)
    os.truncate(replica[short.disk_id], short.size_bytes)
    before = {d: p.read_bytes() for d, p in replica.items()}
    done = apply(h.cycle(9), replica)
    assert done["kind"] == "resync"
    differing = sum(
        before[d][i : i + BLOCK_SIZE] != p.read_bytes()[i : i + BLOCK_SIZE]
        for d, p in replica.items()
        for i in range(0, p.stat().st_size, BLOCK_SIZE)
    )
    assert done["blocks"] <= 8 and done["blocks"] >= differing >= 1
    for spec, path in zip(h.record.disks, h.paths, strict=True):
        assert replica[spec.disk_id].read_bytes() == path.read_bytes()
    assert h.item.record.next_seq == 10
    assert h.item.record.phase is ReplicationPhase.REPLICATING
    await h.item.close()


async def test_offline_initial_replication_writes_the_signed_cycle_to_a_file(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    export = tmp_path / "export"
    h.record = h.record.model_copy(
        update={
            "initial_replication": InitialReplication.OFFLINE,
            "export_path": str(export),
            "next_seq": 3,
        }
    )
    h.item = ItemReplicator(h.folder, h.record, h.host, h.wiring)
    await h.item.open()
    h.write(10)
    await h.item.initial_replication()
    path = export / str(h.record.item_id) / "cycle-3.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [lines[0]["type"], lines[-1]["type"]] == ["CycleStarted", "CycleCompleted"]
    assert all(
        Envelope.model_validate(line).signature_valid(IDENTITY.public_key)
        and line["producer_id"] == str(IDENTITY.producer_id)
        for line in lines
    )
    assert not list(export.rglob("*.tmp"))
    assert h.item.record.next_seq == 4
    assert h.item.record.phase is ReplicationPhase.REPLICATING
    await h.item.close()


async def test_a_change_log_over_half_the_disk_asks_for_a_resync(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.item.open()
    await h.item.ship_cycle(CycleKind.INITIAL)
    h.write(10)
    assert not await h.item.check_change_log()
    h.write(60, Pattern.SEQUENTIAL)  # the log keeps growing while nothing ships (paused)
    assert await h.item.check_change_log()
    fault = [e for e in h.events if type(e).__name__ == "ReplicationFaulted"]
    assert len(fault) == 1 and fault[0].needs_resync  # type: ignore[attr-defined]
    assert h.item.record.phase is ReplicationPhase.RESYNC_REQUIRED
    assert not list(h.folder.glob("*.jnl"))
    await h.item.close()


def test_encode_block_sends_incompressible_blocks_raw_and_flags_them() -> None:
    from services.replication.delta_prepare import block_bytes

    disk = {"size_bytes": 4 * BLOCK_SIZE, "block_size": BLOCK_SIZE}
    noise = os.urandom(BLOCK_SIZE)
    text = (b"the quick brown fox " * (BLOCK_SIZE // 20 + 1))[:BLOCK_SIZE]
    raw = encode_block(0, noise, Compression.ZLIB)
    packed = encode_block(1, text, Compression.ZLIB)
    zero = encode_block(2, bytes(BLOCK_SIZE), Compression.ZLIB)
    plain = encode_block(3, text, Compression.NONE)
    assert raw.block.compressed is False and raw.wire_len == BLOCK_SIZE
    assert base64.b64decode(raw.block.data or "") == noise
    assert packed.block.compressed is None and packed.wire_len < BLOCK_SIZE // 4
    assert zero.block.zero and zero.block.data is None and zero.block.compressed is None
    assert zero.digest == hashlib.sha256(bytes(BLOCK_SIZE)).digest()
    assert plain.block.compressed is None and plain.wire_len == BLOCK_SIZE
    # the replica honours the per-block flag over the batch's compression
    assert block_bytes(raw.block, disk, Compression.ZLIB) == noise
    assert block_bytes(packed.block, disk, Compression.ZLIB) == text
    assert block_bytes(zero.block, disk, Compression.ZLIB) is None
    assert block_bytes(plain.block, disk, Compression.NONE) == text


def test_the_compression_probe_skips_random_data_but_not_mixed_or_structured_data() -> None:
    from shared.delta_blocks import _worth_compressing

    half = BLOCK_SIZE // 2
    noise = os.urandom(BLOCK_SIZE)
    # random at the start, zeros in the middle: the cheap look can't rule it out, zlib can
    mixed = os.urandom(half) + bytes(half)
    # every byte value present, but in long runs: compresses well
    runs = b"".join(bytes([i % 256]) * 16 for i in range(BLOCK_SIZE // 16))
    assert not _worth_compressing(noise)
    assert _worth_compressing(mixed)
    assert _worth_compressing(runs)
    assert encode_block(0, mixed, Compression.ZLIB).wire_len < 0.6 * BLOCK_SIZE


def test_kafka_sink_pipelines_batches_and_completes_after_every_ack() -> None:
    """Batches go out without waiting for each ack (a window of them); a batch whose send
    failed is sent again; CycleCompleted leaves only once every batch is acknowledged."""
    import asyncio

    from aiokafka.errors import KafkaTimeoutError

    from services.host_agent import cycles
    from shared.schemas.replication import BlocksShipped, CycleCompleted, DiskRoot

    item = uuid.uuid4()
    log: list[tuple[str, str]] = []  # (what, type:batch_no)

    class FakeProducer:
        def __init__(self) -> None:
            self.pending: list[tuple[asyncio.Future[None], str]] = []
            self.failed_once = False

        async def send(self, topic: str, value: bytes, *, key: str) -> asyncio.Future[None]:
            env = json.loads(value)
            name = f"{env['type']}:{env['payload'].get('batch_no', '')}"
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            log.append(("sent", name))
            self.pending.append((fut, name))
            return fut

        async def send_and_wait(self, topic: str, value: bytes, *, key: str) -> None:
            fut = await self.send(topic, value, key=key)
            self.ack_all()
            await fut

        def ack_all(self) -> None:
            for fut, name in self.pending:
                if fut.done():
                    continue
                if name == "BlocksShipped:1" and not self.failed_once:
                    self.failed_once = True
                    fut.set_exception(KafkaTimeoutError())
                else:
                    log.append(("acked", name))
                    fut.set_result(None)
            self.pending = []

    async def run() -> None:
        producer = FakeProducer()
        sink = cycles.KafkaSink(producer, lambda p: _sign(p), item)  # type: ignore[arg-type]
        block = encode_block(0, b"x" * BLOCK_SIZE, Compression.NONE).block
        for n in range(3):
            batch = BlocksShipped(
                item_id=item, cycle_seq=1, batch_no=n, disk_id="d", blocks=[block]
            )
            await sink.emit(batch)
        assert [w for w, _ in log] == ["sent"] * 3  # no ack awaited yet
        producer.ack_all()
        await sink.emit(
            CycleCompleted(
                item_id=item,
                cycle_seq=1,
                kind=CycleKind.DELTA,
                batches=3,
                blocks=3,
                disks=[DiskRoot(disk_id="d", size_bytes=BLOCK_SIZE, merkle_root="0" * 64)],
                source_time=datetime.now(UTC),
            )
        )
        await sink.close()

    def _sign(payload: EventPayload) -> Any:
        from shared.schemas.envelope import new_envelope

        return new_envelope(payload, vault_id=uuid.uuid4(), producer_id="p")

    from datetime import UTC, datetime

    asyncio.run(run())
    acked = [n for w, n in log if w == "acked"]
    assert sorted(acked[:3]) == ["BlocksShipped:0", "BlocksShipped:1", "BlocksShipped:2"]
    assert acked[-1] == "CycleCompleted:"
    assert [n for w, n in log if w == "sent"].count("BlocksShipped:1") == 2  # re-sent

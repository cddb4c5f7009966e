"""The recovery host's replica fed from its replica feed (real Kafka): a command names a
cycle's offset range; the agent applies exactly that item's and cycle's blocks (other items'
records, other cycles' and undecodable records in the range are skipped), answers with its
roots, answers a repeated command the same, refuses a point that cannot follow, undoes a point
whose roots are not the source's, applies a cycle that changed nothing without a read, and
applies the next point on a replica seeded from an image on the host."""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from kit.stack import Stack, random_prefix
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_feed import ReplicaFeed
from services.host_agent.wiring import CommandFailed
from shared import topics
from shared.kafka.admin import ensure_topics
from shared.kafka.security import KafkaSecurity
from shared.merkle import block_hash, zero_block_hash
from shared.schemas.agent import (
    ReplicaDisk,
    ReplicaPointApplyRequested,
    ReplicaSeedRequested,
    SeedImage,
)
from shared.schemas.envelope import EventPayload, new_envelope
from shared.schemas.replication import Block, BlocksShipped, Compression
from tests.support.site_replica_worker import seed_bytes, seeded_sources, write_seed_images
from tests.support.store_worker import SourceDisk

pytestmark = pytest.mark.integration
BS = 4096
VAULT = uuid.uuid4()


class Deltas:
    """A one-partition replica feed of its own and a producer of BlocksShipped records (as the
    replication service forwards them)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.prefix = random_prefix("feed")
        self.agent = str(uuid.uuid4())
        self.topic = topics.physical(topics.replica_feed(self.agent), self.prefix)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=stack.kafka, acks="all", **KafkaSecurity.from_env().client_options()
        )

    async def send(self, item: uuid.UUID, value: bytes) -> int:
        meta = await self.producer.send_and_wait(self.topic, value, key=str(item).encode())
        return int(meta.offset)

    async def batch(
        self, item: uuid.UUID, seq: int, disk: SourceDisk, indexes: list[int], *, zlib_: bool
    ) -> int:
        blocks = []
        for i in indexes:
            data = disk.block(disk.image, i)
            sha = block_hash(data).hex()
            if sha == zero_block_hash(len(data)).hex():
                blocks.append(Block(index=i, sha256=sha, zero=True))
            else:
                raw = zlib.compress(data) if zlib_ else data
                blocks.append(Block(index=i, sha256=sha, data=base64.b64encode(raw).decode()))
        msg = BlocksShipped(
            item_id=item,
            cycle_seq=seq,
            batch_no=0,
            disk_id=disk.disk_id,
            compression=Compression.ZLIB if zlib_ else Compression.NONE,
            blocks=blocks,
        )
        env = new_envelope(msg, vault_id=VAULT, producer_id=str(uuid.uuid4()))
        return await self.send(item, env.to_bytes())


@pytest.fixture
async def deltas(stack: Stack) -> AsyncIterator[Deltas]:
    d = Deltas(stack)
    await ensure_topics(
        stack.kafka, d.prefix, [topics.replica_feed(d.agent)], partitions=1, dlq=False
    )
    await d.producer.start()
    yield d
    await d.producer.stop()


def command(
    item: uuid.UUID,
    seq: int,
    first: int | None,
    last: int | None,
    disk: SourceDisk,
    root: str | None = None,
) -> ReplicaPointApplyRequested:
    return ReplicaPointApplyRequested(
        command_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        item_id=item,
        cycle_seq=seq,
        partition=None if first is None else 0,
        first_offset=first,
        last_offset=last,
        disks=[
            ReplicaDisk(
                disk_id=disk.disk_id,
                size_bytes=len(disk.image),
                block_size=BS,
                merkle_root=root or disk.root(),
            )
        ],
        keep_from=1,
    )


async def test_a_point_is_applied_from_its_records_only(deltas: Deltas, tmp_path: Path) -> None:
    item, other = uuid.uuid4(), uuid.uuid4()
    disk = SourceDisk("d0", 40 * BS + 100, BS, random.Random(3))
    disk.write_random(0.6)
    disk.zero([0, 1])
    stranger = SourceDisk("d0", 40 * BS + 100, BS, random.Random(4))
    stranger.write_random(0.5)
    everything = list(range(disk.blocks))
    half = len(everything) // 2

    first = await deltas.batch(other, 1, stranger, everything, zlib_=False)
    await deltas.send(item, b"{not json")
    await deltas.batch(item, 1, disk, everything[:half], zlib_=True)
    await deltas.batch(item, 2, stranger, everything[:5], zlib_=False)  # another cycle
    last = await deltas.batch(item, 1, disk, everything[half:], zlib_=False)

    feed = ReplicaFeed(
        SiteReplica(tmp_path),
        deltas.stack.kafka,
        deltas.prefix,
        tmp_path / "storage",
        agent_id=deltas.agent,
    )
    answer = await feed.apply(command(item, 1, first, last, disk))
    assert answer == {"item_id": str(item), "cycle_seq": 1, "roots": {"d0": disk.root()}}
    image = tmp_path / "replica" / str(item) / "disks" / "d0.vhdx"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == disk.sha256()
    assert await feed.apply(command(item, 1, first, last, disk)) == answer  # repeated

    with pytest.raises(CommandFailed, match="point 3 cannot follow") as behind:
        await feed.apply(command(item, 3, first, last, disk))
    # the service has it catch up from the point it holds (services/replication/catch_up.py)
    assert behind.value.details == {"replica_seq": 1, "cycle_seq": 3}

    before = disk.sha256()
    changed = disk.write_random(0.2)
    at = await deltas.batch(item, 2, disk, changed, zlib_=False)
    with pytest.raises(CommandFailed, match="roots after apply"):
        await feed.apply(command(item, 2, at, at, disk, root="ab" * 32))
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    assert (await feed.apply(command(item, 2, at, at, disk)))["cycle_seq"] == 2
    assert hashlib.sha256(image.read_bytes()).hexdigest() == disk.sha256()
    # a cycle that changed nothing names no range: applied without a read
    assert await feed.apply(command(item, 3, None, None, disk)) == {
        "item_id": str(item),
        "cycle_seq": 3,
        "roots": {"d0": disk.root()},
    }
    assert feed.reader.starts == 1  # every point read through one consumer
    await feed.close()


async def test_a_seeded_replica_takes_the_next_point_from_the_feed(
    deltas: Deltas, tmp_path: Path
) -> None:
    item = uuid.uuid4()
    image = write_seed_images(tmp_path / "storage" / "web01")[1]  # 4 KiB blocks, sparse, short
    feed = ReplicaFeed(
        SiteReplica(tmp_path / "state"),
        deltas.stack.kafka,
        deltas.prefix,
        tmp_path / "storage",
        agent_id=deltas.agent,
    )
    reports: list[EventPayload] = []

    async def emit(event: EventPayload) -> None:
        reports.append(event)

    seed = ReplicaSeedRequested(
        command_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        item_id=item,
        request_id=uuid.uuid4(),
        cycle_seq=1,
        disks=[
            SeedImage(
                disk_id=image.disk_id,
                path=str(image.path),
                size_bytes=image.size_bytes,
                block_size=BS,
            )
        ],
    )
    [disk] = seeded_sources([image], {image.disk_id: seed_bytes(image)}, random.Random(5))
    answer = await feed.seed(seed, emit)
    assert answer["roots"] == {"d1": disk.root()} and answer["cycle_seq"] == 1
    assert [type(r).__name__ for r in reports] == ["ReplicaLeavesReported"]

    changed = disk.write_random(0.3)
    disk.zero([7])
    at = await deltas.batch(item, 2, disk, [*changed, 7], zlib_=True)
    assert await feed.apply(command(item, 2, at, at, disk)) == {
        "item_id": str(item),
        "cycle_seq": 2,
        "roots": {"d1": disk.root()},
    }
    replica = tmp_path / "state" / "replica" / str(item) / "disks" / "d1.vhdx"
    assert hashlib.sha256(replica.read_bytes()).hexdigest() == disk.sha256()
    await feed.close()

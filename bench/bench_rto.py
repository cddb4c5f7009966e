"""Failover RTO by disk size, over the recovery host's replica, on the real stack (services, one
host agent per site and the site providers as real processes; a fresh database and topic
prefix per size).

For each size (default 1 GiB and 8 GiB, `BENCH_RTO_SIZES`): a VM with one disk of that size
(160 random 64 KiB blocks written, the rest sparse) is protected and replicated until the
recovery host's replica holds its latest point (not timed). Then, each from the job's
`created_at` (the request) to its `ended_at` (the VM running; server clocks):

- `failover_rto_test_<size>_seconds`: a test failover (network `none`) of the latest point;
  its cleanup follows (not timed);
- `failover_rto_planned_<size>_seconds`: a planned failover after 20 more blocks were written
  (source shut down, final cycle, zero-data-loss proof, the VM created and started);
- `failover_rto_planned_8gib_vs_1gib_ratio` and `failover_rto_test_8gib_vs_1gib_ratio` (when
  both sizes ran): 8 GiB / 1 GiB (1.0: failover time does not grow with the disk; a test
  failover runs over differencing disks on the replica, a planned one over its images).

And on a 1 GiB VM: `failover_rto_older_point_seconds`, an unplanned failover to the point
10 cycles before the latest (the replica rolled back over the blocks changed since).

Then the recovery host's replica alone (services/host_agent/replica_feed.py and replica.py in
this process, no platform), a 1 GiB disk on a delta topic of its own, 40 points of 8 random
64 KiB blocks after an initial all-zero point:
- `replica_apply_points_per_second`: the points applied one after another (each: its offset
  range read, blocks checked and staged, applied durably, roots computed);
- `replica_apply_4_items_{one_at_a_time,side_by_side}_points_per_second` and their ratio: the
  points of 4 items (64 MiB disks, 15 points each) applied one after another, and 4 items at a
  time (each item's in order) as the agent's replica lane does (`DR_AGENT_REPLICA_PARALLEL`);
- `replica_rollback_10_points_seconds`: the replica returned to the point 10 before its HEAD
  (what a failover to an older point does before the handover), its roots checked;
- `replica_range_read_oneoff_ms` and `replica_range_read_shared_ms`: the median read of one
  point's range with a consumer started for it (`read_range`) and through one started
  consumer (`RangeReader`, as the agent reads); `replica_range_read_oneoff_vs_shared_ratio`.

The replication service runs as it ships, without a block copy; `BENCH_KEEP_BLOCK_COPY=1`
runs it with one (the failovers go over the recovery host's replica either way).

Lines: `bench <name> <value> <unit>`; a measurement that fails prints
`bench <name> FAILED <reason>`. Run: `.venv/bin/python -m bench.bench_rto` (`make up` first).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import statistics
import tempfile
import time
import traceback
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from bench.harness import bench_platform, emit, failed
from kit.dr import (
    DrSetup,
    failover_known,
    failover_up,
    finished,
    item,
    points,
    protect,
    start,
    two_sites,
    vm_named,
)
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack, delete_prefixed_topics, random_prefix, stack_from_env
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_feed import ReplicaFeed
from shared import topics
from shared.kafka.admin import ensure_topics
from shared.kafka.ranges import RangeReader, read_range
from shared.kafka.security import KafkaSecurity
from shared.merkle import MerkleTree, block_count, block_hash, zero_block_hash
from shared.schemas.agent import ReplicaDisk, ReplicaPointApplyRequested
from shared.schemas.envelope import new_envelope
from shared.schemas.replication import MAX_BLOCKS_PER_BATCH, Block, BlocksShipped

SIZES = [s.strip() for s in os.environ.get("BENCH_RTO_SIZES", "1GiB,8GiB").split(",") if s]
WRITTEN = 160
SETUP_TIMEOUT = 1800.0
REPLICA_DISK = 2**30
REPLICA_BS = 65536
REPLICA_POINTS = 40
REPLICA_BLOCKS = 8
REPLICA_BACK = 10


def label(size: str) -> str:
    return size.lower()


def seconds(job: dict[str, Any]) -> float:
    assert job["state"] == "succeeded", (job.get("error"), job.get("failed_tasks"))
    ended = datetime.fromisoformat(job["ended_at"])
    return (ended - datetime.fromisoformat(job["created_at"])).total_seconds()


def start_replication(plat: Platform) -> None:
    """The replication service without a block copy, or with one (`BENCH_KEEP_BLOCK_COPY=1`;
    failover goes over the recovery host's replica either way)."""
    copy = os.environ.get("BENCH_KEEP_BLOCK_COPY", "0") == "1"
    plat.start("replication", {"DR_REPLICATION_KEEP_BLOCK_COPY": "true" if copy else "false"})


async def replicated_vm(http: httpx.AsyncClient, dr: DrSetup, name: str, size: str) -> str:
    """A protected VM whose latest point the recovery host's replica holds; its item id."""
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": name, "disks": [size]})
    await dr.agent_call(http, "hv-p1", "POST", f"/vms/{name}/writes", {"blocks": WRITTEN})
    protected = await protect(http, dr, (await vm_named(http, dr, name))["vm_id"])
    item_id = str(protected["item_id"])
    await held_latest(http, dr, item_id)
    await failover_known(http, dr, item_id)
    return item_id


async def held_latest(http: httpx.AsyncClient, dr: DrSetup, item_id: str) -> int:
    async def caught_up() -> int | None:
        now = await item(http, dr, item_id)
        latest = now["last_committed_seq"]
        ok = now["initial_done_at"] and latest and (now["replica_seq"] or 0) >= latest
        return int(latest) if ok else None

    return await eventually(caught_up, timeout=SETUP_TIMEOUT, interval=1, what="replica held")


async def job(http: httpx.AsyncClient, dr: DrSetup, path: str, body: dict[str, Any]) -> Any:
    resp = await start(http, dr, path, body)
    assert resp.status_code == 202, resp.text
    return await finished(http, dr, resp.json()["job_id"], timeout=SETUP_TIMEOUT)


async def one_size(stack: Stack, size: str, tests: dict[str, float]) -> float | None:
    """The planned failover's seconds (None: it failed); the test failover's into `tests`."""
    name = label(size)
    async with (
        bench_platform(stack, f"rto-{name}") as (plat, root),
        httpx.AsyncClient(timeout=60) as http,
    ):
        start_replication(plat)
        dr = await two_sites(plat, http, root, copy_seconds=2)
        await failover_up(plat, http, dr)
        item_id = await replicated_vm(http, dr, "rto", size)
        try:
            test = await job(http, dr, f"/failovers/{item_id}/test-failover", {"network": "none"})
            tests[name] = seconds(test)
            emit(f"failover_rto_test_{name}_seconds", tests[name], "s")
            await job(http, dr, f"/failovers/{item_id}/test-failover-cleanup", {})
        except Exception as exc:
            traceback.print_exc()
            failed(f"failover_rto_test_{name}_seconds", repr(exc))
        try:
            await dr.agent_call(http, "hv-p1", "POST", "/vms/rto/writes", {"blocks": 20})
            planned = seconds(await job(http, dr, f"/failovers/{item_id}/planned-failover", {}))
            emit(f"failover_rto_planned_{name}_seconds", planned, "s")
            return planned
        except Exception as exc:
            traceback.print_exc()
            failed(f"failover_rto_planned_{name}_seconds", repr(exc))
            return None


async def older_point(stack: Stack) -> None:
    async with (
        bench_platform(stack, "rto-older") as (plat, root),
        httpx.AsyncClient(timeout=60) as http,
    ):
        start_replication(plat)
        dr = await two_sites(plat, http, root, copy_seconds=1)
        await failover_up(plat, http, dr)
        item_id = await replicated_vm(http, dr, "old", "1GiB")
        for _ in range(11):
            before = await held_latest(http, dr, item_id)
            await dr.agent_call(http, "hv-p1", "POST", "/vms/old/writes", {"blocks": 8})

            async def newer(before: int = before) -> bool:
                return await held_latest(http, dr, item_id) > before

            await eventually(newer, timeout=120, what="a newer point held")
        latest = await held_latest(http, dr, item_id)
        retained = sorted(p["cycle_seq"] for p in await points(http, dr, item_id))
        target = max(s for s in retained if s <= latest - 10)
        body = {"choice": "chosen", "cycle_seq": target, "shutdown_source": False}
        run = await job(http, dr, f"/failovers/{item_id}/unplanned-failover", body)
        emit("failover_rto_older_point_seconds", seconds(run), "s")


FEED_AGENT = "bench-agent"  # whose replica feed the points are on (a topic prefix of their own)


class FeedPoints:
    """Points of one item's 1 GiB disk on a replica feed of its own: (seq, first, last, root)."""

    def __init__(
        self,
        stack: Stack,
        prefix: str | None = None,
        disk: int = REPLICA_DISK,
        points: int = REPLICA_POINTS,
        seed: int = 7,
    ) -> None:
        self.stack = stack
        self.prefix = prefix or random_prefix("bench-feed")
        self.topic = topics.physical(topics.replica_feed(FEED_AGENT), self.prefix)
        self.item = uuid.uuid4()
        self.vault = uuid.uuid4()
        self.disk, self.count, self.seed = disk, points, seed
        self.blocks = block_count(disk, REPLICA_BS)
        zero = zero_block_hash(REPLICA_BS)
        self.tree = MerkleTree.from_leaves([zero] * self.blocks, self.blocks)
        self.points: list[tuple[int, int, int, str]] = []

    async def produce(self) -> None:
        await ensure_topics(
            self.stack.kafka,
            self.prefix,
            [topics.replica_feed(FEED_AGENT)],
            partitions=1,
            dlq=False,
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.stack.kafka,
            acks="all",
            **KafkaSecurity.from_env().client_options(),
        )
        await producer.start()
        try:
            zero = zero_block_hash(REPLICA_BS).hex()
            offsets = []
            for start in range(0, self.blocks, MAX_BLOCKS_PER_BATCH):
                end = min(self.blocks, start + MAX_BLOCKS_PER_BATCH)
                blocks = [Block(index=i, sha256=zero, zero=True) for i in range(start, end)]
                offsets.append(await self._send(producer, 1, blocks))
            self.points.append((1, offsets[0], offsets[-1], self.tree.root_hex()))
            rng = random.Random(self.seed)
            for seq in range(2, self.count + 2):
                blocks = []
                for i in rng.sample(range(self.blocks), REPLICA_BLOCKS):
                    data = rng.randbytes(REPLICA_BS)
                    digest = block_hash(data)
                    self.tree.set_leaf(i, digest)
                    blocks.append(
                        Block(index=i, sha256=digest.hex(), data=base64.b64encode(data).decode())
                    )
                at = await self._send(producer, seq, blocks)
                self.points.append((seq, at, at, self.tree.root_hex()))
        finally:
            await producer.stop()

    async def _send(self, producer: AIOKafkaProducer, seq: int, blocks: list[Block]) -> int:
        msg = BlocksShipped(
            item_id=self.item, cycle_seq=seq, batch_no=0, disk_id="d0", blocks=blocks
        )
        env = new_envelope(msg, vault_id=self.vault, producer_id=str(uuid.uuid4()))
        meta = await producer.send_and_wait(self.topic, env.to_bytes(), key=str(self.item).encode())
        return int(meta.offset)

    def command(self, point: tuple[int, int, int, str]) -> ReplicaPointApplyRequested:
        seq, first, last, root = point
        disk = ReplicaDisk(
            disk_id="d0", size_bytes=self.disk, block_size=REPLICA_BS, merkle_root=root
        )
        return ReplicaPointApplyRequested(
            command_id=uuid.uuid4(),
            agent_id=uuid.uuid4(),
            item_id=self.item,
            cycle_seq=seq,
            partition=0,
            first_offset=first,
            last_offset=last,
            disks=[disk],
            keep_from=1,
        )


async def replica_feed(stack: Stack) -> None:
    feed_points = FeedPoints(stack)
    try:
        await feed_points.produce()
        await replica_apply_and_rollback(stack, feed_points)
        await range_reads(stack, feed_points)
    finally:
        await delete_prefixed_topics(stack.kafka, feed_points.prefix)


async def replica_apply_and_rollback(stack: Stack, fp: FeedPoints) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-replica-") as tmp:
        replica = SiteReplica(Path(tmp))
        feed = ReplicaFeed(
            replica, stack.kafka, fp.prefix, Path(tmp) / "storage", agent_id=FEED_AGENT
        )
        try:
            await feed.apply(fp.command(fp.points[0]))  # the initial point: not timed
            started = time.perf_counter()
            for point in fp.points[1:]:
                await feed.apply(fp.command(point))
            took = time.perf_counter() - started
        finally:
            await feed.close()
        emit("replica_apply_points_per_second", REPLICA_POINTS / took, "1/s")
        seq, _, _, root = fp.points[-1 - REPLICA_BACK]
        item = str(fp.item)
        started = time.perf_counter()
        head = await asyncio.to_thread(replica.rollback, item, seq)
        took = time.perf_counter() - started
        if head.seq != seq or replica.roots(item) != {"d0": root}:
            failed(f"replica_rollback_{REPLICA_BACK}_points_seconds", "roots not the point's")
        else:
            emit(f"replica_rollback_{REPLICA_BACK}_points_seconds", took, "s")


SIDE_ITEMS = 4  # items whose points a recovery host applies (the agent's replica_parallel)
SIDE_POINTS = 15
SIDE_DISK = 64 * 2**20


async def replica_side_by_side(stack: Stack) -> None:
    """The points of several items applied one after another (one at a time, as the agent's
    replica lane did) and up to `SIDE_ITEMS` items at a time (each item's in order, as it does
    with `DR_AGENT_REPLICA_PARALLEL`), on the same host, each on a fresh replica."""
    prefix = random_prefix("bench-side")
    fps = [FeedPoints(stack, prefix, SIDE_DISK, SIDE_POINTS, seed=n) for n in range(SIDE_ITEMS)]
    try:
        for fp in fps:
            await fp.produce()
        rates = {}
        for mode in ("one_at_a_time", "side_by_side"):
            with tempfile.TemporaryDirectory(prefix="bench-replica-side-") as tmp:
                feed = ReplicaFeed(
                    SiteReplica(Path(tmp)),
                    stack.kafka,
                    prefix,
                    Path(tmp) / "s",
                    agent_id=FEED_AGENT,
                )
                try:
                    for fp in fps:
                        await feed.apply(fp.command(fp.points[0]))  # initial points: not timed

                    async def item_points(fp: FeedPoints, feed: ReplicaFeed = feed) -> None:
                        for point in fp.points[1:]:
                            await feed.apply(fp.command(point))

                    started = time.perf_counter()
                    if mode == "one_at_a_time":
                        for fp in fps:
                            await item_points(fp)
                    else:
                        await asyncio.gather(*(item_points(fp) for fp in fps))
                    took = time.perf_counter() - started
                finally:
                    await feed.close()
            rates[mode] = SIDE_ITEMS * SIDE_POINTS / took
            emit(f"replica_apply_{SIDE_ITEMS}_items_{mode}_points_per_second", rates[mode], "1/s")
        ratio = rates["side_by_side"] / rates["one_at_a_time"]
        emit(f"replica_apply_{SIDE_ITEMS}_items_side_by_side_vs_one_at_a_time_ratio", ratio, "x")
    finally:
        await delete_prefixed_topics(stack.kafka, prefix)


async def range_reads(stack: Stack, fp: FeedPoints) -> None:
    ranges = fp.points[1:]
    oneoff: list[float] = []
    for _, first, last, _ in ranges:
        started = time.perf_counter()
        async for _records in read_range(stack.kafka, fp.topic, 0, first, last):
            pass
        oneoff.append(time.perf_counter() - started)
    shared: list[float] = []
    reader = RangeReader(stack.kafka)
    try:
        for _, first, last, _ in ranges:
            started = time.perf_counter()
            async with contextlib.aclosing(reader.read(fp.topic, 0, first, last)) as batches:
                async for _records in batches:
                    pass
            shared.append(time.perf_counter() - started)
    finally:
        await reader.close()
    emit("replica_range_read_oneoff_ms", statistics.median(oneoff) * 1000, "ms")
    emit("replica_range_read_shared_ms", statistics.median(shared) * 1000, "ms")
    ratio = statistics.median(oneoff) / statistics.median(shared)
    emit("replica_range_read_oneoff_vs_shared_ratio", ratio, "x")


async def main() -> None:
    stack = stack_from_env()
    planned: dict[str, float] = {}
    tests: dict[str, float] = {}
    for size in SIZES:
        try:
            value = await one_size(stack, size, tests)
            if value is not None:
                planned[label(size)] = value
        except Exception as exc:
            traceback.print_exc()
            failed(f"failover_rto_{label(size)}", repr(exc))
    if "8gib" in planned and "1gib" in planned:
        emit("failover_rto_planned_8gib_vs_1gib_ratio", planned["8gib"] / planned["1gib"], "x")
    if "8gib" in tests and "1gib" in tests:
        emit("failover_rto_test_8gib_vs_1gib_ratio", tests["8gib"] / tests["1gib"], "x")
    try:
        await older_point(stack)
    except Exception as exc:
        traceback.print_exc()
        failed("failover_rto_older_point_seconds", repr(exc))
    try:
        await replica_feed(stack)
    except Exception as exc:
        traceback.print_exc()
        failed("replica_apply_points_per_second", repr(exc))
    try:
        await replica_side_by_side(stack)
    except Exception as exc:
        traceback.print_exc()
        failed(f"replica_apply_{SIDE_ITEMS}_items_side_by_side_vs_one_at_a_time_ratio", repr(exc))


if __name__ == "__main__":
    asyncio.run(main())

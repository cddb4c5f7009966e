"""Bad input never yields a recovery point: a truncated cycle, a replayed old cycle, a forged
signature, a tampered block and a cycle for an item of another vault are each rejected (DLQ
with its reason, or the item's state with its reason), and the item recovers by resync.

The test plays the host agent itself (registered through the API with a key pair of its own,
signing with its private key), so every message is exactly what the test says it is."""

from __future__ import annotations

import base64
import contextlib
import hmac
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kit.dr import (
    DrSetup,
    item,
    points,
    protect,
    register_agent,
    two_sites,
    vm_named,
)
from kit.platform import Platform
from kit.poll import eventually
from shared import db, signing, topics
from shared.kafka.producer import KafkaProducer
from shared.kafka.security import KafkaSecurity
from shared.merkle import BLOCK_SIZE, MerkleTree, block_hash
from shared.schemas import replication as ev
from shared.schemas.envelope import EventPayload, new_envelope
from tests.support.kafka import wait_for_records

pytestmark = pytest.mark.e2e

BLOCKS = 4
DISK_SIZE = BLOCKS * BLOCK_SIZE


class ScriptedAgent:
    """Ships cycles for one item of a one-disk VM, signing as a registered agent."""

    def __init__(self, dr: DrSetup, producer: KafkaProducer, reg: dict[str, Any], disk: str):
        self.dr = dr
        self.producer = producer
        self.producer_id = reg["producer_id"]
        self.vault_id = uuid.UUID(reg["vault_id"])
        self.key = reg["private_key"]
        self.disk_id = disk
        self.blocks = [os.urandom(BLOCK_SIZE) for _ in range(BLOCKS)]
        self.item_id = uuid.UUID(int=0)

    def root(self, blocks: list[bytes] | None = None) -> str:
        leaves = [block_hash(b) for b in (blocks or self.blocks)]
        return MerkleTree.from_leaves(leaves, len(leaves)).root_hex()

    async def send(
        self,
        payload: EventPayload,
        *,
        key: Ed25519PrivateKey | None = None,
        vault: uuid.UUID | None = None,
    ) -> uuid.UUID:
        env = new_envelope(
            payload,
            vault_id=vault or self.vault_id,
            producer_id=self.producer_id,
            signing_key=key if key is not None else self.key,
        )
        await self.producer.publish(env, key=str(self.item_id), topic=topics.REPLICATION_DELTAS)
        return env.event_id

    def started(self, seq: int, kind: ev.CycleKind) -> ev.CycleStarted:
        return ev.CycleStarted(
            item_id=self.item_id,
            cycle_seq=seq,
            kind=kind,
            source_time=datetime.now(UTC),
            disks=[ev.DiskGeometry(disk_id=self.disk_id, size_bytes=DISK_SIZE)],
        )

    def batch(
        self, seq: int, indexes: list[int], tamper: bool = False, batch_no: int = 0
    ) -> ev.BlocksShipped:
        blocks = []
        for i in indexes:
            data = self.blocks[i] if not tamper else os.urandom(BLOCK_SIZE)
            blocks.append(
                ev.Block(
                    index=i,
                    sha256=block_hash(self.blocks[i]).hex(),
                    data=base64.b64encode(data).decode(),
                )
            )
        return ev.BlocksShipped(
            item_id=self.item_id,
            cycle_seq=seq,
            batch_no=batch_no,
            disk_id=self.disk_id,
            blocks=blocks,
        )

    def completed(
        self, seq: int, kind: ev.CycleKind, batches: int, blocks: int
    ) -> ev.CycleCompleted:
        return ev.CycleCompleted(
            item_id=self.item_id,
            cycle_seq=seq,
            kind=kind,
            batches=batches,
            blocks=blocks,
            source_time=datetime.now(UTC),
            disks=[
                ev.DiskRoot(disk_id=self.disk_id, size_bytes=DISK_SIZE, merkle_root=self.root())
            ],
        )

    async def send_on_another_partition(self, payload: EventPayload) -> uuid.UUID:
        """Publish `payload` keyed by the item, but on another partition than Kafka's default
        partitioner (murmur2) gives that key (as a publisher with another partitioner does)."""
        plat = self.dr.plat
        physical = topics.physical(topics.REPLICATION_DELTAS, plat.prefix)
        raw = AIOKafkaProducer(
            bootstrap_servers=plat.stack.kafka, **KafkaSecurity.from_env().client_options()
        )
        await raw.start()
        try:
            count = len(await raw.partitions_for(physical))
            key = str(self.item_id).encode()
            wrong = (topics.partition_for(key, count) + 1) % count
            env = new_envelope(
                payload,
                vault_id=self.vault_id,
                producer_id=self.producer_id,
                signing_key=self.key,
            )
            await raw.send_and_wait(physical, env.to_bytes(), key=key, partition=wrong)
        finally:
            await raw.stop()
        return env.event_id

    async def cycle(self, seq: int, kind: ev.CycleKind, indexes: list[int]) -> None:
        await self.send(self.started(seq, kind))
        if indexes:
            await self.send(self.batch(seq, indexes))
        await self.send(self.completed(seq, kind, 1 if indexes else 0, len(indexes)))


@contextlib.asynccontextmanager
async def scripted_item(
    platform: Platform, http: httpx.AsyncClient, root: Path, vm_name: str, host: str
) -> AsyncIterator[tuple[DrSetup, ScriptedAgent, str]]:
    """A one-disk VM on a primary host whose agent is the test itself (no agent process): the
    sites, the agent's registration, the protected item, and a `ScriptedAgent` for its cycles."""
    vms = [{"name": vm_name, "host": host, "disks": [{"name": "os", "size": DISK_SIZE}]}]
    dr = await two_sites(platform, http, root, primary_hosts=(host,), primary_vms=vms, agents_on=())
    reg = await register_agent(http, platform, dr.key, host)
    vm = await vm_named(http, dr, vm_name)
    producer = KafkaProducer(platform.stack.kafka, platform.prefix, f"scripted-{host}")
    await producer.start()
    try:
        agent = ScriptedAgent(dr, producer, reg, vm["disks"][0]["disk_id"])
        item_id = (await protect(http, dr, vm["vm_id"]))["item_id"]
        agent.item_id = uuid.UUID(item_id)
        yield dr, agent, item_id
    finally:
        await producer.stop()


async def test_no_recovery_point_from_bad_input(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Any
) -> None:
    async with scripted_item(platform, http, tmp_path, "fake01", "hv-fake") as (dr, agent, item_id):
        producer = agent.producer
        dlq = platform.prefix + topics.dlq_of(topics.REPLICATION_DELTAS)

        async def state_is(*states: str) -> dict[str, Any] | None:
            current = await item(http, dr, item_id)
            return current if current["state"] in states else None

        async def dead_lettered(event_id: uuid.UUID, reason: str) -> None:
            found = await wait_for_records(
                platform.stack.kafka, dlq, lambda r: r.event_id == str(event_id)
            )
            assert found[0].headers["dlq.reason"] == reason

        await agent.cycle(1, ev.CycleKind.INITIAL, list(range(BLOCKS)))
        await eventually(lambda: state_is("replicating"), what="initial point committed")

        # 1. A truncated cycle: the end says one batch, none arrived.
        await agent.send(agent.started(2, ev.CycleKind.DELTA))
        await agent.send(agent.completed(2, ev.CycleKind.DELTA, batches=1, blocks=1))
        broken = await eventually(
            lambda: state_is("resynchronizing", "waiting_to_start_resync"),
            what="truncated cycle -> resync",
        )
        assert "truncated cycle" in broken["error"] and broken["health"] == "Critical"
        assert [p["cycle_seq"] for p in await points(http, dr, item_id)] == [1]

        # The agent answers the resync with only what differs: nothing. Back to replicating.
        await agent.cycle(2, ev.CycleKind.RESYNC, [])
        recovered = await eventually(lambda: state_is("replicating"), what="resync committed")
        assert recovered["health"] == "Normal" and recovered["last_committed_seq"] == 2

        # 2. A replayed old cycle (new event id, valid signature).
        replay = await agent.send(agent.started(1, ev.CycleKind.INITIAL))
        await dead_lettered(replay, "replayed_cycle")

        # 3. A forged signature, and one made with the published public key as a private key.
        forged = await agent.send(
            agent.started(3, ev.CycleKind.DELTA), key=signing.new_private_key()
        )
        await dead_lettered(forged, "bad_signature")
        published = signing.load_private_key(signing.public_key_hex(agent.key))
        from_the_topic = await agent.send(agent.started(3, ev.CycleKind.DELTA), key=published)
        await dead_lettered(from_the_topic, "bad_signature")
        # ... and one signed the retired HMAC way (64 hex digits), keyed with the public key.
        retired = new_envelope(
            agent.started(3, ev.CycleKind.DELTA),
            vault_id=agent.vault_id,
            producer_id=agent.producer_id,
        )
        mac = hmac.new(
            bytes.fromhex(signing.public_key_hex(agent.key)),
            signing.canonical_json(retired.signed_fields()),
            "sha256",
        )
        retired = retired.model_copy(update={"signature": mac.hexdigest()})  # not validated
        await producer.publish(retired, key=str(agent.item_id), topic=topics.REPLICATION_DELTAS)
        await dead_lettered(retired.event_id, "invalid_envelope")

        # 4. A cycle for this item signed by an agent of another vault.
        other = await platform.new_vault(http, "other")
        other_key = (await platform.new_key(http, other["vault_id"]))["key"]
        stranger = await register_agent(http, platform, other_key, "hv-stranger")

        async def stranger_known() -> bool:  # the replication service knows it by now
            conn = await db.connect(platform.database_url)
            try:
                return bool(
                    await conn.fetchval(
                        "SELECT true FROM replication.known_producers WHERE producer_id = $1",
                        uuid.UUID(stranger["producer_id"]),
                    )
                )
            finally:
                await conn.close()

        await eventually(stranger_known, what="the stranger agent is a known producer")
        foreign = ScriptedAgent(dr, producer, stranger, agent.disk_id)
        foreign.item_id = agent.item_id

        async def rejected_for_vault() -> bool:
            # Until the replication service has seen the stranger's registration the record
            # is rejected as from an unknown producer; once it has, for the vault mismatch.
            event = await foreign.send(foreign.started(3, ev.CycleKind.DELTA))
            found = await wait_for_records(
                platform.stack.kafka, dlq, lambda r: r.event_id == str(event)
            )
            reason = found[0].headers["dlq.reason"]
            assert reason in ("unknown_producer", "vault_mismatch"), reason
            return reason == "vault_mismatch"

        await eventually(rejected_for_vault, timeout=60, what="the other-vault cycle rejected")

        # 5. A tampered block: right hash, wrong bytes, valid signature; between good batches
        # sent back to back (the replica takes such runs of batches in one transaction).
        agent.blocks[1] = os.urandom(BLOCK_SIZE)
        await agent.send(agent.started(3, ev.CycleKind.DELTA))
        await agent.send(agent.batch(3, [0], batch_no=0))
        tampered = await agent.send(agent.batch(3, [1], tamper=True, batch_no=1))
        await agent.send(agent.batch(3, [2], batch_no=2))
        await dead_lettered(tampered, "block_hash_mismatch")
        await agent.send(agent.completed(3, ev.CycleKind.DELTA, batches=3, blocks=3))
        bad = await eventually(
            lambda: state_is("resynchronizing", "waiting_to_start_resync"),
            what="tampered block -> resync",
        )
        assert "SHA-256" in bad["error"]
        assert [p["cycle_seq"] for p in await points(http, dr, item_id)] == [2, 1]

        # The resync ships the one changed block; its point verifies.
        await agent.cycle(3, ev.CycleKind.RESYNC, [1])
        await eventually(lambda: state_is("replicating"), what="second resync committed")
        for seq in (1, 2, 3):
            resp = await http.post(
                dr.url("replication", f"/protected-items/{item_id}/recovery-points/{seq}/verify"),
                headers=dr.bearer(dr.reader),
            )
            assert resp.status_code == 200 and resp.json()["ok"], resp.text

        # 6. A record on another partition than Kafka's default partitioner (murmur2) gives
        # its key: dead-lettered with that reason, and the reason shows on the item.
        event_id = await agent.send_on_another_partition(agent.started(4, ev.CycleKind.DELTA))
        await dead_lettered(event_id, "wrong_partition")

        async def shown_on_item() -> dict[str, Any] | None:
            current = await item(http, dr, item_id)
            found = [r for r in current["health_reasons"] if "wrong_partition" in r]
            return current if found and current["health"] == "Warning" else None

        warned = await eventually(shown_on_item, what="the dead-lettered record on the item")
        assert any("murmur2" in r for r in warned["health_reasons"]), warned
        await agent.cycle(4, ev.CycleKind.DELTA, [0])

        async def normal_again() -> dict[str, Any] | None:
            current = await item(http, dr, item_id)
            done = current["last_committed_seq"] == 4 and current["health"] == "Normal"
            return current if done else None

        await eventually(normal_again, what="the next cycle commits and clears it")

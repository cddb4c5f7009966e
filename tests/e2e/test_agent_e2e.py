"""The host agent's data plane over real Kafka: commands in, signed delta cycles out; the test
rebuilds the disks from the cycles, as the replica would, and compares them with the source."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.platform import Platform
from kit.poll import eventually
from kit.procs import REPO, Proc
from shared import signing, topics
from shared.merkle import (
    BLOCK_SIZE,
    MerkleTree,
    block_count,
    block_hash,
    disk_root,
    disk_tree,
)
from shared.schemas.agent import (
    DiskSpec,
    ReplicaSeedRequested,
    ReplicationEnableRequested,
    ReplicationPauseRequested,
    ReplicationResumeRequested,
    ResyncRequested,
    SeedImage,
    VmPowerRequested,
)
from shared.schemas.envelope import Envelope, EventPayload, new_envelope
from tests.support.kafka import produce, read_all, wait_for_records

pytestmark = pytest.mark.e2e


@dataclass
class Agent:
    proc: Proc
    storage: Path
    state: Path
    producer_id: uuid.UUID
    vault_id: uuid.UUID
    credential: str
    public_key: str
    vm: dict[str, Any]

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}

    def disks(self) -> list[DiskSpec]:
        folder = self.storage / self.vm["name"]
        return [
            DiskSpec(disk_id=d["id"], path=str(folder / d["file"]), size_bytes=d["size_bytes"])
            for d in self.vm["disks"]
        ]


async def vmctl(*args: str) -> str:
    """`python -m services.host_agent.vmctl ...`, as an operator would run it."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.host_agent.vmctl", *args],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    return done.stdout.decode()


async def start_agent(platform: Platform, http: httpx.AsyncClient, tmp: Path) -> Agent:
    platform.start("registration")
    vault = await platform.new_vault(http)
    key = (await platform.new_key(http, vault["vault_id"]))["key"]
    storage = tmp / "storage"
    created = await vmctl(
        "create", "--storage", str(storage), "--name", "web01", "--disk", "4MiB", "--disk", "2MiB"
    )
    label = f"hv-{uuid.uuid4().hex[:6]}"
    proc = platform.edge(
        "services.host_agent",
        "DR_AGENT_",
        label,
        {
            "DR_AGENT_REGISTRATION_KEY": key,
            "DR_AGENT_REGISTRATION_URL": platform.url("registration"),
            "DR_AGENT_NAME": label,
            "DR_AGENT_STORAGE_DIR": str(storage),
            "DR_AGENT_HEARTBEAT_SECONDS": "1",
        },
    ).start()
    state = Path(proc.env["DR_AGENT_STATE_DIR"])
    identity = json.loads((state / "identity.json").read_text())
    return Agent(
        proc,
        storage,
        state,
        uuid.UUID(identity["producer_id"]),
        uuid.UUID(identity["vault_id"]),
        identity["credential"],
        signing.public_key_hex(signing.load_private_key(identity["private_key"])),
        json.loads(created),
    )


async def command(platform: Platform, agent: Agent, payload: EventPayload, **kw: Any) -> Envelope:
    env = new_envelope(
        payload,
        vault_id=kw.get("vault_id", agent.vault_id),
        producer_id=kw.get("producer_id", "service:replication"),
    )
    await produce(
        platform.stack.kafka,
        platform.prefix + topics.AGENT_COMMANDS,
        env.to_bytes(),
        key=str(agent.producer_id),
    )
    return env


async def completion(platform: Platform, command_id: uuid.UUID, count: int = 1) -> list[Any]:
    found = await wait_for_records(
        platform.stack.kafka,
        platform.prefix + topics.AGENT_EVENTS,
        lambda r: (
            r.json()["type"] == "CommandCompleted"
            and r.json()["payload"]["command_id"] == str(command_id)
        ),
        count=count,
        timeout=60,
    )
    return [r.json() for r in found]


async def items(http: httpx.AsyncClient, agent: Agent) -> dict[str, Any]:
    resp = await http.get(f"{agent.proc.url}/v1/items", headers=agent.bearer)
    assert resp.status_code == 200, resp.text
    return {i["item_id"]: i for i in resp.json()}


async def wait_cycle(
    http: httpx.AsyncClient, agent: Agent, item_id: uuid.UUID, seq: int
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        item = (await items(http, agent)).get(str(item_id))
        return item if item and item["last_cycle_seq"] >= seq else None

    return await eventually(reached, timeout=90, what=f"cycle {seq} of {item_id} shipped")


@dataclass
class Replica:
    """Rebuilds disks from the delta stream, checking signatures, hashes, counts and roots."""

    public_key: str
    images: dict[str, bytearray] = field(default_factory=dict)
    cycles: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, envelopes: list[dict[str, Any]]) -> None:
        by_seq: dict[int, list[dict[str, Any]]] = {}
        for env in envelopes:
            assert Envelope.model_validate(env).signature_valid(self.public_key)
            by_seq.setdefault(env["payload"]["cycle_seq"], []).append(env)
        for seq in sorted(by_seq):
            msgs = by_seq[seq]
            done = [m["payload"] for m in msgs if m["type"] == "CycleCompleted"]
            if not done:
                continue  # an unfinished cycle never becomes a point
            start = next(m["payload"] for m in msgs if m["type"] == "CycleStarted")
            for disk in start["disks"]:
                self.images.setdefault(disk["disk_id"], bytearray(disk["size_bytes"]))
            batches = [m["payload"] for m in msgs if m["type"] == "BlocksShipped"]
            assert sorted(b["batch_no"] for b in batches) == list(range(done[0]["batches"]))
            assert sum(len(b["blocks"]) for b in batches) == done[0]["blocks"]
            for batch in batches:
                image = self.images[batch["disk_id"]]
                for block in batch["blocks"]:
                    offset = block["index"] * BLOCK_SIZE
                    length = min(BLOCK_SIZE, len(image) - offset)
                    if block["zero"]:
                        data = bytes(length)
                    else:
                        data = base64.b64decode(block["data"])
                        compressed = block.get("compressed")
                        if compressed is None:  # as the batch says
                            compressed = batch["compression"] == "zlib"
                        if compressed:
                            data = zlib.decompress(data)
                    assert hashlib.sha256(data).hexdigest() == block["sha256"]
                    image[offset : offset + length] = data
            for disk in done[0]["disks"]:
                assert self.root(disk["disk_id"]) == disk["merkle_root"], f"cycle {seq}"
            self.cycles.append({**done[0], "shipped_blocks": done[0]["blocks"]})

    def root(self, disk_id: str) -> str:
        image = bytes(self.images[disk_id])
        n = block_count(len(image))
        tree = MerkleTree.from_leaves(
            (block_hash(image[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]) for i in range(n)), n
        )
        return tree.root_hex()

    def leaves(self, disk_id: str) -> bytes:
        image = bytes(self.images[disk_id])
        return b"".join(
            block_hash(image[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
            for i in range(block_count(len(image)))
        )


async def deltas(platform: Platform, item_id: uuid.UUID) -> list[dict[str, Any]]:
    records = await read_all(platform.stack.kafka, platform.prefix + topics.REPLICATION_DELTAS)
    return [r.json() for r in records if r.key == str(item_id)]


def enable_command(agent: Agent, item_id: uuid.UUID, **kw: Any) -> ReplicationEnableRequested:
    return ReplicationEnableRequested(
        command_id=uuid.uuid4(),
        agent_id=agent.producer_id,
        item_id=item_id,
        vm_id=agent.vm["id"],
        vm_name=agent.vm["name"],
        disks=agent.disks(),
        copy_interval_seconds=1,
        **kw,
    )


def assert_identical(agent: Agent, replica: Replica) -> None:
    for spec in agent.disks():
        source = Path(spec.path)
        assert bytes(replica.images[spec.disk_id]) == source.read_bytes(), spec.disk_id
        assert replica.root(spec.disk_id) == disk_root(source)


async def test_initial_and_delta_cycles_rebuild_the_disks(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    agent = await start_agent(platform, http, tmp_path)
    item_id = uuid.uuid4()
    base = agent.proc.url
    # The admin routes want the agent's own credential.
    assert (await http.get(f"{base}/v1/items")).status_code == 401
    assert (
        await http.get(f"{base}/v1/items", headers={"Authorization": "Bearer drc_nope"})
    ).status_code == 401
    resp = await http.post(f"{base}/v1/vms/web01/writes", json={"blocks": 40}, headers=agent.bearer)
    assert resp.status_code == 200, resp.text

    enable = enable_command(agent, item_id, compression="zlib", next_cycle_seq=5)
    await command(platform, agent, enable)
    reply = (await completion(platform, enable.command_id))[0]
    assert reply["payload"]["outcome"] == "succeeded", reply
    assert reply["producer_id"] == str(agent.producer_id) and reply["signature"]
    await wait_cycle(http, agent, item_id, 5)  # the initial cycle

    resp = await http.post(
        f"{base}/v1/vms/web01/workload", json={"blocks_per_second": 40}, headers=agent.bearer
    )
    assert resp.status_code == 200, resp.text
    await wait_cycle(http, agent, item_id, 8)

    # A repeated command id is answered again, not executed again.
    pause = ReplicationPauseRequested(
        command_id=uuid.uuid4(), agent_id=agent.producer_id, item_id=item_id
    )
    resume = ReplicationResumeRequested(
        command_id=uuid.uuid4(), agent_id=agent.producer_id, item_id=item_id
    )
    other = ReplicationPauseRequested(
        command_id=uuid.uuid4(), agent_id=uuid.uuid4(), item_id=item_id
    )
    await command(platform, agent, pause)
    await completion(platform, pause.command_id)
    await command(platform, agent, resume)
    await command(platform, agent, pause)  # again, after the resume
    await command(platform, agent, other)  # another agent's: ignored
    await command(platform, agent, pause)
    replies = await completion(platform, pause.command_id, count=3)
    assert len({json.dumps(r["payload"], sort_keys=True) for r in replies}) == 1
    await completion(platform, resume.command_id)
    assert not (await items(http, agent))[str(item_id)]["paused"]
    events = await read_all(platform.stack.kafka, platform.prefix + topics.AGENT_EVENTS)
    assert not [e for e in events if str(other.command_id) in e.value.decode()]

    # Shutdown ships a final cycle with the last changes before it answers.
    power = VmPowerRequested(
        command_id=uuid.uuid4(), agent_id=agent.producer_id, vm_id=agent.vm["id"], action="shutdown"
    )
    await command(platform, agent, power)
    done = (await completion(platform, power.command_id))[0]["payload"]
    assert done["outcome"] == "succeeded", done
    final = done["result"]["final_cycle"]
    assert final["kind"] == "final"
    vm = json.loads((agent.storage / "web01" / "vm.json").read_text())
    assert vm["state"] == "Off"

    replica = Replica(agent.public_key)
    replica.apply(await deltas(platform, item_id))
    seqs = [c["cycle_seq"] for c in replica.cycles]
    assert seqs == list(range(5, final["cycle_seq"] + 1)), seqs
    kinds = [c["kind"] for c in replica.cycles]
    assert kinds[0] == "initial" and kinds[-1] == "final" and set(kinds[1:-1]) == {"delta"}
    assert_identical(agent, replica)
    for disk_id, root in final["roots"].items():
        assert replica.root(disk_id) == root

    # Every message stayed far below Kafka's 1 MiB.
    records = await read_all(platform.stack.kafka, platform.prefix + topics.REPLICATION_DELTAS)
    assert max(len(r.value) for r in records if r.key == str(item_id)) < 800 * 1024
    metrics = (await http.get(f"{base}/metrics")).text
    assert 'dr_agent_cycles_shipped_total{kind="delta"}' in metrics
    assert "dr_agent_last_cycle_timestamp_seconds" in metrics

    # Bad commands go to the DLQ with their reason; the consumer goes on.
    marker = f"bad-{uuid.uuid4().hex[:6]}"
    topic = platform.prefix + topics.AGENT_COMMANDS
    await produce(platform.stack.kafka, topic, b'{"type": "Nope"}', key=marker)
    stranger = new_envelope(
        ReplicationPauseRequested(
            command_id=uuid.uuid4(), agent_id=agent.producer_id, item_id=item_id
        ),
        vault_id=agent.vault_id,
        producer_id=str(uuid.uuid4()),
    )
    await produce(platform.stack.kafka, topic, stranger.to_bytes(), key=marker)
    group = f"agent.{agent.producer_id}"  # other tests' agents may run in this session too
    dlq = await wait_for_records(
        platform.stack.kafka,
        topics.dlq_of(topic),
        lambda r: r.key == marker and r.headers["dlq.consumer.group"].endswith(group),
        count=2,
    )
    assert sorted(r.headers["dlq.reason"] for r in dlq) == ["invalid_envelope", "not_a_service"]


async def test_restarts_scan_mode_and_resync(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    agent = await start_agent(platform, http, tmp_path)
    item_id = uuid.uuid4()
    replica = Replica(agent.public_key)
    await command(platform, agent, enable_command(agent, item_id))
    await wait_cycle(http, agent, item_id, 1)

    async def write(blocks: int) -> None:
        resp = await http.post(
            f"{agent.proc.url}/v1/vms/web01/writes", json={"blocks": blocks}, headers=agent.bearer
        )
        assert resp.status_code == 200, resp.text

    # kill -9 after the journal was written: no resync, the changes still ship.
    await write(30)
    agent.proc.kill()
    agent.proc.start()
    seq = (await items(http, agent))[str(item_id)]["next_cycle_seq"]
    await wait_cycle(http, agent, item_id, seq + 1)
    assert not (await items(http, agent))[str(item_id)]["needs_resync"]

    # Clean stop, the image changed outside the agent: scan mode finds it.
    agent.proc.stop()
    raw = ["--state", str(agent.state), "--name", "web01", "--blocks", "12", "--raw"]
    await vmctl("write", "--storage", str(agent.storage), *raw)
    agent.proc.start()
    seq = (await items(http, agent))[str(item_id)]["next_cycle_seq"]
    await wait_cycle(http, agent, item_id, seq + 1)
    replica.apply(await deltas(platform, item_id))
    assert_identical(agent, replica)

    # kill -9, then the journal is lost: the agent asks for a resync and ships only the diff.
    await write(20)
    agent.proc.kill()
    for segment in (agent.state / "items" / str(item_id)).glob("*.jnl"):
        segment.unlink()
    agent.proc.start()
    faulted = await wait_for_records(
        platform.stack.kafka,
        platform.prefix + topics.AGENT_EVENTS,
        lambda r: (
            r.json()["type"] == "ReplicationFaulted"
            and r.json()["payload"]["item_id"] == str(item_id)
        ),
    )
    assert faulted[0].json()["payload"]["needs_resync"] is True
    status = (await items(http, agent))[str(item_id)]
    assert status["needs_resync"]
    replica.apply(await deltas(platform, item_id))  # whatever was committed before the crash
    resync_id, resync_seq = uuid.uuid4(), status["next_cycle_seq"] + 3
    specs = agent.disks()
    for spec in specs:
        leaves = replica.leaves(spec.disk_id)
        half = len(leaves) // 64 * 32  # two chunks per disk
        for chunk_no, (first, part) in enumerate(((0, leaves[:half]), (half // 32, leaves[half:]))):
            await command(
                platform,
                agent,
                ResyncRequested(
                    command_id=uuid.uuid4(),
                    agent_id=agent.producer_id,
                    item_id=item_id,
                    resync_id=resync_id,
                    cycle_seq=resync_seq,
                    disk_id=spec.disk_id,
                    disk_count=len(specs),
                    size_bytes=len(replica.images[spec.disk_id]),
                    chunk_no=chunk_no,
                    chunks=2,
                    first_index=first,
                    leaf_hashes=base64.b64encode(part).decode(),
                ),
            )
    await wait_cycle(http, agent, item_id, resync_seq + 1)  # resync, then deltas go on
    before = {d: bytes(img) for d, img in replica.images.items()}
    replica.apply(
        [e for e in await deltas(platform, item_id) if e["payload"]["cycle_seq"] >= resync_seq]
    )
    resync = next(c for c in replica.cycles if c["cycle_seq"] == resync_seq)
    assert resync["kind"] == "resync"
    differing = sum(
        1
        for spec in specs
        for i in range(0, spec.size_bytes, BLOCK_SIZE)
        if before[spec.disk_id][i : i + BLOCK_SIZE]
        != replica.images[spec.disk_id][i : i + BLOCK_SIZE]
    )
    assert 0 < resync["shipped_blocks"] <= 20 and resync["shipped_blocks"] >= differing
    total = sum(block_count(s.size_bytes) for s in specs)
    assert resync["shipped_blocks"] < total // 2, "a resync is no full copy"
    status = (await items(http, agent))[str(item_id)]
    assert not status["needs_resync"] and status["state"] == "replicating"
    assert_identical(agent, replica)


async def test_a_seed_reports_signed_leaves_before_its_answer(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The old primary host seeds a reverse item's replica from the VM's images there: its
    leaf hashes go out signed, on the agent's key, ahead of the answer with the roots."""
    agent = await start_agent(platform, http, tmp_path)
    item_id, request_id = uuid.uuid4(), uuid.uuid4()
    specs = agent.disks()
    seed = ReplicaSeedRequested(
        command_id=uuid.uuid4(),
        agent_id=agent.producer_id,
        item_id=item_id,
        request_id=request_id,
        cycle_seq=1,
        disks=[SeedImage(disk_id=s.disk_id, path=s.path, size_bytes=s.size_bytes) for s in specs],
    )
    # A seed naming a disk twice goes to the DLQ with its reason; the agent goes on.
    bad = json.loads(
        new_envelope(seed, vault_id=agent.vault_id, producer_id="service:r").to_bytes()
    )
    bad["payload"]["disks"] *= 2
    topic, marker = platform.prefix + topics.AGENT_COMMANDS, f"bad-{uuid.uuid4().hex[:6]}"
    await produce(platform.stack.kafka, topic, json.dumps(bad).encode(), key=marker)
    [dead] = await wait_for_records(
        platform.stack.kafka,
        topics.dlq_of(topic),
        lambda r: (
            r.key == marker
            and r.headers["dlq.consumer.group"].endswith(f"agent.{agent.producer_id}")
        ),
    )
    assert dead.headers["dlq.reason"] == "invalid_payload"
    assert "each disk is named once" in dead.headers["dlq.detail"]

    await command(platform, agent, seed)
    [answer] = await completion(platform, seed.command_id)
    roots = {s.disk_id: disk_root(Path(s.path)) for s in specs}
    assert answer["payload"]["outcome"] == "succeeded", answer
    assert answer["payload"]["result"] == {
        "item_id": str(item_id),
        "request_id": str(request_id),
        "cycle_seq": 1,
        "roots": roots,
    }
    records = await read_all(platform.stack.kafka, platform.prefix + topics.AGENT_EVENTS)
    done = next(r for r in records if r.json()["event_id"] == answer["event_id"])
    reports = [
        r
        for r in records
        if r.json()["type"] == "ReplicaLeavesReported"
        and r.json()["payload"]["request_id"] == str(request_id)
    ]
    assert [r.json()["payload"]["disk_id"] for r in reports] == [s.disk_id for s in specs]
    for record, spec in zip(reports, specs, strict=True):
        env = Envelope.model_validate_json(record.value)
        assert env.signature_valid(agent.public_key)
        assert (record.key, record.partition) == (str(agent.producer_id), done.partition)
        assert record.offset < done.offset  # ahead of the answer
        payload = env.payload
        assert (payload["chunk_no"], payload["chunks"], payload["first_index"]) == (0, 1, 0)
        leaves = b"".join(disk_tree(Path(spec.path)).leaf_hashes())
        assert base64.b64decode(payload["leaf_hashes"]) == leaves

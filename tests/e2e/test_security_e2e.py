"""Attacks on the platform's trust boundary, each against the real services, Kafka and
PostgreSQL, each shown refused with nothing changed: recovery plan scripts, answers from who was
not asked, inventory of another vault, oversize and bomb blocks, path traversal."""

from __future__ import annotations

import base64
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kit import procs
from kit.dr import (
    DrSetup,
    failover_known,
    failover_up,
    finished,
    item,
    points,
    protect,
    register_agent,
    start,
    two_sites,
    vm_named,
)
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack
from shared import signing, topics
from shared.kafka.producer import KafkaProducer
from shared.merkle import block_hash
from shared.schemas import agent as agent_ev
from shared.schemas import replication as ev
from shared.schemas.envelope import EventPayload, new_envelope
from shared.schemas.inventory import DiscoveryChange, Inventory, Removals, Vm
from tests.e2e.test_failover_e2e import protected_vm, task_named
from tests.e2e.test_inventory_e2e import identity_of
from tests.e2e.test_replication_bad_input_e2e import (
    BLOCKS,
    DISK_SIZE,
    scripted_item,
)
from tests.support.kafka import wait_for_records
from tests.support.own_platform import WITH_BLOCK_COPY, own_platform

pytestmark = pytest.mark.e2e


async def vault_with_tokens(platform: Platform, http: httpx.AsyncClient) -> DrSetup:
    platform.start("registration")
    vault = await platform.new_vault(http, "sec")
    dr = DrSetup(plat=platform, vault_id=vault["vault_id"], root=Path("/nonexistent"))
    dr.admin = await platform.new_token(http, dr.vault_id, "admin")
    dr.operator = await platform.new_token(http, dr.vault_id, "operator")
    dr.reader = await platform.new_token(http, dr.vault_id, "reader")
    return dr


async def failover_knows(platform: Platform, http: httpx.AsyncClient, dr: DrSetup) -> None:
    platform.start("failover")

    async def known() -> bool:
        for token in (dr.reader, dr.operator, dr.admin):
            resp = await http.get(dr.url("failover", "/jobs"), headers=dr.bearer(token))
            if resp.status_code != 200:
                return False
        return True

    await eventually(known, timeout=30, what="the failover service knows the vault's tokens")


def script_plan(name: str, script: str, args: list[str] | None = None) -> dict[str, Any]:
    action = {"action_id": "s1", "name": "probe", "kind": "script", "script": script}
    return {"name": name, "groups": [{"pre_actions": [{**action, "args": args or []}]}]}


async def plans(http: httpx.AsyncClient, dr: DrSetup) -> list[dict[str, Any]]:
    resp = await http.get(dr.url("failover", "/recovery-plans"), headers=dr.bearer(dr.reader))
    assert resp.status_code == 200, resp.text
    return list(resp.json())


async def test_script_actions_admin_only_named_from_the_folder_with_no_secret(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr = await vault_with_tokens(platform, http)
    await failover_knows(platform, http, dr)
    env_file = tmp_path / "script-env.txt"
    probe = platform.script(
        "#!/bin/sh\n"
        f'env > "{env_file}"\n'
        # what a careless script might print: the platform's secrets, if it could see them
        f'echo "admin=$DR_ADMIN_TOKEN db=$DATABASE_URL"\n'
        f'echo "leaked {platform.admin_token} Authorization: Bearer {dr.admin}"\n'
        "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done\n"
        "echo last-line\n"
    )

    # --- an operator cannot create a script action, even a good one
    resp = await start(http, dr, "/recovery-plans", script_plan("op", probe))
    assert resp.status_code == 403 and "only an admin" in resp.text, resp.text

    # --- no paths, no traversal, no links out of the folder, nothing not executable
    outside = tmp_path / "evil.sh"
    outside.write_text("#!/bin/sh\ntouch /tmp/pwned\n")
    outside.chmod(0o755)
    link = f"link-{dr.vault_id[:8]}.sh"
    (platform.scripts_dir / link).symlink_to(outside)
    plain = f"plain-{dr.vault_id[:8]}.sh"
    (platform.scripts_dir / plain).write_text("#!/bin/sh\n")
    for bad in (str(outside), "../evil.sh", "..", "sub/x.sh"):
        resp = await start(http, dr, "/recovery-plans", script_plan("bad", bad), dr.admin)
        assert resp.status_code == 422, (bad, resp.text)
    for bad, why in ((link, "outside the scripts folder"), (plain, "not executable")):
        resp = await start(http, dr, "/recovery-plans", script_plan("bad", bad), dr.admin)
        assert resp.status_code == 422 and why in resp.text, (bad, resp.text)
    resp = await http.post(
        dr.url("failover", "/recovery-plans"),
        json={
            "name": "bad",
            "groups": [{"pre_actions": [{"name": "p", "kind": "script", "path": str(outside)}]}],
        },
        headers=dr.bearer(dr.admin),
    )
    assert resp.status_code == 422, resp.text
    assert await plans(http, dr) == []  # nothing was created

    # --- an admin creates one; an operator may edit its items, not its script
    resp = await start(http, dr, "/recovery-plans", script_plan("probe", probe), dr.admin)
    assert resp.status_code == 201, resp.text
    changed = script_plan("probe", probe, ["--now"])
    resp = await http.put(
        dr.url("failover", "/recovery-plans/probe"), json=changed, headers=dr.bearer(dr.operator)
    )
    assert resp.status_code == 403, resp.text
    same = {**script_plan("probe", probe), "description": "edited by an operator"}
    resp = await http.put(
        dr.url("failover", "/recovery-plans/probe"), json=same, headers=dr.bearer(dr.operator)
    )
    assert resp.status_code == 200, resp.text
    [stored] = await plans(http, dr)
    assert stored["groups"][0]["pre_actions"][0]["args"] == []

    # --- run it: minimal environment, only an exit code and a clean excerpt in the job
    resp = await start(http, dr, "/recovery-plans/probe/test-failover", {"network": "none"})
    assert resp.status_code == 202, resp.text
    job = await finished(http, dr, resp.json()["job_id"])
    assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert set(env) - {"PWD", "SHLVL", "_", "OLDPWD"} == {
        "PATH",
        "DR_PLAN_JOB_ID",
        "DR_PLAN_OPERATION",
        "DR_PLAN_VAULT_ID",
        "DR_PLAN_TARGET",
        "DR_PLAN_ACTION_ID",
    }, env
    assert env["DR_PLAN_JOB_ID"] == job["job_id"] and env["DR_PLAN_VAULT_ID"] == dr.vault_id
    [task] = task_named(job, "script: probe")
    detail = task["detail"]
    assert set(detail) == {"returncode", "output"} and detail["returncode"] == 0
    output = detail["output"]
    assert output.endswith("last-line\n") and output.startswith("[...]")
    assert len(output) <= 2000 + len("[...]")
    assert platform.admin_token not in str(job) and dr.admin not in str(job)
    assert "admin= db=" not in output  # the first lines were cut; the env is checked above
    leaked = platform.script(f"#!/bin/sh\necho 'leaked {platform.admin_token} {dr.admin}'\n")
    resp = await start(http, dr, "/recovery-plans", script_plan("leak", leaked), dr.admin)
    assert resp.status_code == 201, resp.text
    resp = await start(http, dr, "/recovery-plans/leak/test-failover", {"network": "none"})
    job = await finished(http, dr, resp.json()["job_id"])
    [task] = task_named(job, "script: probe")
    assert task["detail"]["output"] == "leaked [redacted] [redacted]\n", task["detail"]

    # --- a script removed from the folder fails the step with a clear reason
    (platform.scripts_dir / probe).unlink()
    resp = await start(http, dr, "/recovery-plans/probe/test-failover", {"network": "none"})
    job = await finished(http, dr, resp.json()["job_id"])
    assert job["state"] == "failed" and "could not start" in job["error"], job["error"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def zlib_bomb(expanded: int) -> bytes:
    deflate = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    return b"".join(deflate.compress(zeros) for _ in range(expanded >> 20)) + deflate.flush()


async def test_decompression_bomb_and_oversize_disk_go_to_the_dlq_memory_bounded(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with scripted_item(platform, http, tmp_path, "bomb01", "hv-bomb") as (dr, agent, item_id):
        pid = platform.services["replication"].popen.pid  # type: ignore[union-attr]
        dlq = platform.prefix + topics.dlq_of(topics.REPLICATION_DELTAS)

        async def state_is(*states: str) -> dict[str, Any] | None:
            current = await item(http, dr, item_id)
            return current if current["state"] in states else None

        async def dead_lettered(event_id: uuid.UUID) -> tuple[str, str]:
            found = await wait_for_records(
                platform.stack.kafka, dlq, lambda r: r.event_id == str(event_id)
            )
            return found[0].headers["dlq.reason"], found[0].headers.get("dlq.detail", "")

        await agent.cycle(1, ev.CycleKind.INITIAL, list(range(BLOCKS)))
        await eventually(lambda: state_is("replicating"), what="initial point committed")
        rss_before = rss_bytes(pid)
        peak = rss_before

        def bomb_batch(seq: int, expanded: int) -> ev.BlocksShipped:
            data = base64.b64encode(zlib_bomb(expanded)).decode()
            sha = block_hash(agent.blocks[0]).hex()
            return ev.BlocksShipped(
                item_id=agent.item_id,
                cycle_seq=seq,
                batch_no=0,
                disk_id=agent.disk_id,
                compression=ev.Compression.ZLIB,
                blocks=[ev.Block(index=0, sha256=sha, data=data)],
            )

        # 1. 48 MiB of zeros in a ~48 KB block: decompression stops at the block's 64 KiB;
        # 2. 600 MiB in ~600 KB: refused on its size before it is even decoded
        for seq, (expanded, why) in enumerate(
            ((48 << 20, "expands beyond"), (600 << 20, "characters of base64")), start=2
        ):
            await agent.send(agent.started(seq, ev.CycleKind.DELTA))
            event = await agent.send(bomb_batch(seq, expanded))
            reason, error = await dead_lettered(event)
            assert reason == "bad_block" and why in error, (reason, error)
            peak = max(peak, rss_bytes(pid))
            await eventually(
                lambda: state_is("resynchronizing", "waiting_to_start_resync"),
                what="the bomb's cycle given up -> resync",
            )
            await agent.cycle(seq, ev.CycleKind.RESYNC, [])
            await eventually(lambda: state_is("replicating"), what="resync committed")
            peak = max(peak, rss_bytes(pid))

        # 3. a cycle claiming a 60 TiB disk, another disk, or too large a block size
        seq = 4
        for disks, reason in (
            ([ev.DiskGeometry(disk_id=agent.disk_id, size_bytes=60 << 40)], "disk_size_mismatch"),
            ([ev.DiskGeometry(disk_id="not-a-disk", size_bytes=DISK_SIZE)], "unknown_disk"),
            (
                [ev.DiskGeometry(disk_id=agent.disk_id, size_bytes=DISK_SIZE, block_size=4 << 20)],
                "bad_geometry",
            ),
        ):
            started = agent.started(seq, ev.CycleKind.DELTA).model_copy(update={"disks": disks})
            event = await agent.send(started)
            assert (await dead_lettered(event))[0] == reason
        peak = max(peak, rss_bytes(pid))
        print(f"replication service RSS: {rss_before >> 20} MiB before, peak {peak >> 20} MiB")
        assert peak - rss_before < 40 << 20, (rss_before, peak)
        # nothing changed: the same single point, the item replicating, its disk as it was
        current = await item(http, dr, item_id)
        assert current["state"] == "replicating" and current["last_committed_seq"] == 3
        assert [p["cycle_seq"] for p in await points(http, dr, item_id)] == [3, 2, 1]
        # and the item goes on: a good cycle 4 commits
        await agent.cycle(4, ev.CycleKind.DELTA, [0])

        async def committed() -> bool:
            return bool((await item(http, dr, item_id))["last_committed_seq"] == 4)

        await eventually(committed, what="a good cycle after the attacks commits")


async def publish_as(
    producer: KafkaProducer,
    payload: EventPayload,
    *,
    vault_id: str,
    producer_id: str,
    private_key: Ed25519PrivateKey | str,
    topic: str,
) -> uuid.UUID:
    """`payload` signed with the producer's own private key (an object or its hex form)."""
    key = (
        private_key
        if isinstance(private_key, Ed25519PrivateKey)
        else signing.load_private_key(private_key)
    )
    env = new_envelope(
        payload, vault_id=uuid.UUID(vault_id), producer_id=producer_id, signing_key=key
    )
    await producer.publish(env, key=producer_id, topic=topic)
    return env.event_id


@pytest.fixture
async def copying_platform(stack: Stack, tmp_path: Path) -> AsyncIterator[Platform]:
    """A platform whose replication service keeps a block copy: it copies a point the
    recovery host's replica does not hold, with the host down."""
    own = await own_platform(stack, "answers", tmp_path, WITH_BLOCK_COPY)
    try:
        yield own
    finally:
        await own.close()


async def test_an_answer_counts_only_from_whom_it_was_asked(
    copying_platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    platform = copying_platform
    # 10 s cycles: the retained crash-consistent points (5) span longer than the replication
    # service's wait for the replica before it copies (30 s), so the drill's point is still
    # there to copy
    dr = await two_sites(platform, http, tmp_path, copy_seconds=10)
    await failover_up(platform, http, dr)
    vm = await protected_vm(http, dr, "ans01", ["256KiB"], "10.10.0.191")
    item_id = vm["item_id"]
    await failover_known(http, dr, item_id)
    other = await platform.new_vault(http, "ans-other")
    other_key = (await platform.new_key(http, other["vault_id"]))["key"]
    stranger = await register_agent(http, platform, other_key, "hv-stranger")
    dlq = platform.prefix + topics.dlq_of(topics.AGENT_EVENTS)
    producer = KafkaProducer(platform.stack.kafka, platform.prefix, "answer-forger")
    await producer.start()
    try:
        # the recovery host's agent is down: the job waits for its answer to "create the VM".
        # The drill asks for a point its replica does not hold, so the replication service
        # copies that point (after waiting for the replica) rather than asking the host for it.
        dr.agents["hv-r1"].stop()

        async def drill_started() -> httpx.Response | None:
            held = (await item(http, dr, item_id))["replica_seq"] or 0
            latest = max((p["cycle_seq"] for p in await points(http, dr, item_id)), default=0)
            if latest <= held:
                return None  # no point past the replica yet
            body = {"network": "none", "choice": "chosen", "cycle_seq": latest}
            resp = await start(http, dr, f"/failovers/{item_id}/test-failover", body)
            # 404/409: the failover service's read model of the points is catching up
            return None if resp.status_code in (404, 409) else resp

        resp = await eventually(
            drill_started, timeout=90, what="a drill of a point past the replica"
        )
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]

        async def waiting_task() -> dict[str, Any] | None:
            got = await http.get(
                dr.url("failover", f"/jobs/{job_id}"), headers=dr.bearer(dr.reader)
            )
            tasks = task_named(got.json(), "create and start the VM")
            return tasks[0] if tasks and tasks[0]["state"] == "in_progress" else None

        task = await eventually(waiting_task, timeout=120, what="the job waits for hv-r1")
        forged = agent_ev.CommandCompleted(
            command_id=uuid.UUID(task["command_id"]),
            command_type="VmCreateRequested",
            outcome=agent_ev.CommandOutcome.FAILED,
            error="forged failure",
        )
        primary = dr.agent_identity("hv-p1")

        async def refused(event_id: uuid.UUID) -> str:
            found = await wait_for_records(
                platform.stack.kafka, dlq, lambda r: r.event_id == str(event_id)
            )
            return str(found[0].headers["dlq.reason"])

        # 1. the vault's other agent (hv-p1) answers a command sent to hv-r1
        event = await publish_as(
            producer,
            forged,
            vault_id=dr.vault_id,
            producer_id=primary["producer_id"],
            private_key=primary["private_key"],
            topic=topics.AGENT_EVENTS,
        )
        assert await refused(event) == "wrong_answerer"

        # 2. another vault's agent answers it, under its own vault and under this one
        async def stranger_refused() -> bool:
            event = await publish_as(
                producer,
                forged,
                vault_id=stranger["vault_id"],
                producer_id=stranger["producer_id"],
                private_key=stranger["private_key"],
                topic=topics.AGENT_EVENTS,
            )
            reason = await refused(event)
            assert reason in ("unknown_producer", "vault_mismatch"), reason
            return reason == "vault_mismatch"

        await eventually(stranger_refused, timeout=60, what="another vault's answer refused")
        event = await publish_as(
            producer,
            forged,
            vault_id=dr.vault_id,
            producer_id=stranger["producer_id"],
            private_key=stranger["private_key"],
            topic=topics.AGENT_EVENTS,
        )
        assert await refused(event) in ("vault_mismatch", "bad_signature")

        # nothing changed: the task still waits; hv-r1 back, the job succeeds
        assert await waiting_task() is not None
        dr.agents["hv-r1"].start()
        job = await finished(http, dr, job_id)
        assert job["state"] == "succeeded", (job["error"], job["failed_tasks"])
    finally:
        await producer.stop()


async def test_vaults_with_the_same_names_keep_their_own_vms(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Two vaults, each with a site 'primary', a host 'hv-twin' and a VM 'twin01' (disks of
    different sizes): each protects its own VM; vault B's provider publishing vault A's VM id
    is refused and changes nothing of vault A."""
    setups = []
    for label, blocks in (("a", BLOCKS), ("b", 2 * BLOCKS)):
        vms = [
            {"name": "twin01", "host": "hv-twin", "disks": [{"name": "os", "size": blocks * 65536}]}
        ]
        root = tmp_path / label
        root.mkdir()
        dr = await two_sites(
            platform, http, root, primary_hosts=("hv-twin",), primary_vms=vms, agents_on=()
        )
        await register_agent(http, platform, dr.key, "hv-twin")
        setups.append((dr, await vm_named(http, dr, "twin01")))
    (a, vm_a), (b, vm_b) = setups
    assert vm_a["vm_id"] != vm_b["vm_id"]
    assert [d["size_bytes"] for d in vm_a["disks"]] == [BLOCKS * 65536]

    # vault B's provider describes a VM under vault A's id (its own names, a huge disk)
    ident = identity_of(b.providers["primary"])
    stolen = Vm.model_validate(
        {
            **{k: v for k, v in vm_b.items() if k in Vm.model_fields},
            "vm_id": vm_a["vm_id"],
            "disks": [{**vm_b["disks"][0], "size_bytes": 64 << 30}],
        }
    )
    change = DiscoveryChange(
        site="primary", sequence=2**62, upserts=Inventory(vms=[stolen]), removals=Removals()
    )
    producer = KafkaProducer(platform.stack.kafka, platform.prefix, "twin-provider")
    await producer.start()
    try:
        event = await publish_as(
            producer,
            change,
            vault_id=str(ident.vault_id),
            producer_id=str(ident.producer_id),
            private_key=ident.private_key,
            topic=topics.INVENTORY_DISCOVERY,
        )
    finally:
        await producer.stop()
    found = await wait_for_records(
        platform.stack.kafka,
        platform.prefix + topics.dlq_of(topics.INVENTORY_DISCOVERY),
        lambda r: r.event_id == str(event),
    )
    assert found[0].headers["dlq.reason"] == "foreign_id"
    assert await vm_named(http, a, "twin01") == vm_a  # vault A's VM unchanged

    # each vault protects its own VM, with its own disks
    for dr, vm, blocks in ((a, vm_a, BLOCKS), (b, vm_b, 2 * BLOCKS)):
        protected = await protect(http, dr, vm["vm_id"])
        got = await item(http, dr, protected["item_id"])
        assert got["vm_id"] == vm["vm_id"], got
        assert [d["size_bytes"] for d in got["disks"]] == [blocks * 65536], got
        # and the other vault can't see it
        other = b if dr is a else a
        resp = await http.get(
            other.url("replication", f"/protected-items/{protected['item_id']}"),
            headers=other.bearer(other.reader),
        )
        assert resp.status_code == 404, resp.text


async def test_path_traversal_through_every_path_input_is_refused(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Materialise target folders and offline import folders must resolve (after links)
    under the configured roots; a target holding a VM is never overwritten."""
    async with scripted_item(platform, http, tmp_path, "path01", "hv-path") as (dr, agent, item_id):
        await agent.cycle(1, ev.CycleKind.INITIAL, list(range(BLOCKS)))

        async def committed() -> bool:
            return bool((await item(http, dr, item_id))["last_committed_seq"] == 1)

        await eventually(committed, what="the first point committed")

    roots = Path(platform.services["replication"].env["DR_REPLICATION_MATERIALISE_ROOTS"])
    outside = Path("/tmp") / f"dr-outside-{uuid.uuid4().hex[:8]}"
    escape = tmp_path / "escape"
    escape.symlink_to(outside)
    holds_vm = tmp_path / "running-vm"
    holds_vm.mkdir()
    (holds_vm / "vm.json").write_text("{}")
    url = dr.url("replication", f"/protected-items/{item_id}/recovery-points/1/materialise")
    for target, why in (
        (str(outside), "not under an allowed folder"),
        (f"{roots}/../../../{outside}", "not under an allowed folder"),
        (str(escape / "disks"), "not under an allowed folder"),
        ("relative/dir", "not an absolute path"),
        (str(holds_vm), "holds a VM"),
    ):
        resp = await http.post(url, json={"target_dir": target}, headers=dr.bearer(dr.operator))
        assert resp.status_code == 422 and why in resp.text, (target, resp.text)
    assert not outside.exists()  # nothing written anywhere
    assert sorted(p.name for p in holds_vm.iterdir()) == ["vm.json"]
    good = tmp_path / "materialised"
    resp = await http.post(url, json={"target_dir": str(good)}, headers=dr.bearer(dr.operator))
    assert resp.status_code == 200, resp.text
    assert [d["path"] for d in resp.json()["disks"]] == [str(good / f"{agent.disk_id}.vhdx")]

    # offline import: the folder of exported cycles must lie under the roots too
    imported = dr.url("replication", f"/protected-items/{item_id}/import")
    (tmp_path / "courier").symlink_to("/etc")
    for path in ("/etc", f"{roots}/../../../etc", str(tmp_path / "courier")):
        resp = await http.post(imported, json={"path": path}, headers=dr.bearer(dr.operator))
        assert resp.status_code == 422 and "not under an allowed folder" in resp.text, resp.text
    assert (await item(http, dr, item_id))["last_committed_seq"] == 1


@pytest.mark.parametrize(
    ("token", "why"),
    [(None, "DR_ADMIN_TOKEN is not set"), ("short-token", "too weak"), ("a" * 40, "too weak")],
)
def test_a_service_refuses_to_start_without_a_strong_admin_token(
    platform: Platform, tmp_path: Path, token: str | None, why: str
) -> None:
    env = {k: v for k, v in platform.env.items() if k != "DR_ADMIN_TOKEN"}
    if token is not None:
        env["DR_ADMIN_TOKEN"] = token
    proc = procs.service("policy", env, tmp_path)
    proc.env.pop("DR_ADMIN_TOKEN", None)
    # the child inherits this process's environment first: blank the variable there too
    with pytest.raises(RuntimeError, match="exited with"):
        proc.start(extra_env={"DR_ADMIN_TOKEN": token or ""})
    assert why in proc.tail(), proc.tail()


async def test_tokens_expire_and_never_reach_another_vault(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    dr = await vault_with_tokens(platform, http)
    platform.start("policy")
    other = await vault_with_tokens(platform, http)
    resp = await http.post(
        dr.url("registration", "/tokens"),
        json={"name": "short-lived", "role": "reader", "expires_in": 3},
        headers=dr.bearer(dr.admin),
    )
    assert resp.status_code == 201, resp.text
    short = resp.json()
    assert short["expires_at"] is not None
    bad = await http.post(
        dr.url("registration", "/tokens"),
        json={"name": "never", "role": "reader", "expires_in": 0},
        headers=dr.bearer(dr.admin),
    )
    assert bad.status_code == 422, bad.text

    async def reads(token: str, setup: DrSetup) -> int:
        got = await http.get(setup.url("policy", "/policies"), headers=setup.bearer(token))
        return got.status_code

    async def works() -> bool:
        return await reads(short["token"], dr) == 200

    await eventually(works, what="the short-lived token works (policy knows it)")
    # a token of one vault reads nothing of another, whatever its role
    for token in (dr.reader, dr.admin, short["token"]):
        assert await reads(token, other) == 403

    async def expired() -> bool:
        got = await http.get(dr.url("policy", "/policies"), headers=dr.bearer(short["token"]))
        return got.status_code == 401 and "expired" in got.text

    await eventually(expired, timeout=30, what="the token expired")
    assert await reads(dr.reader, dr) == 200  # the vault's other tokens go on

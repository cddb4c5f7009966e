"""Killing a service between writing a state change and publishing its event loses nothing:
the transactional outbox publishes it after the restart."""

from __future__ import annotations

import uuid

import httpx
import pytest

from kit import procs as processes
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack, delete_prefixed_topics, fresh_database, random_prefix
from shared import topics
from tests.support.kafka import read_all, wait_for_records

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("crash_at", ["outbox.before_publish", "outbox.after_publish"])
async def test_kill_between_commit_and_publish_loses_no_event(
    stack: Stack, tmp_path: object, crash_at: str
) -> None:
    plat = Platform(
        stack=stack,
        database_url=await fresh_database(stack, "crash"),
        prefix=random_prefix("crash"),
        log_dir=tmp_path,  # type: ignore[arg-type]
    )
    proc = processes.service("registration", plat.env, plat.log_dir)
    proc.start(extra_env={"DR_CRASH_AT": crash_at})
    topic = plat.prefix + topics.REGISTRATION_EVENTS
    name = f"crash-{uuid.uuid4().hex[:6]}"
    try:
        vault_id: str | None = None
        async with httpx.AsyncClient(timeout=10) as http:
            try:
                resp = await http.post(
                    f"{proc.url}/v1/vaults", json={"name": name}, headers=plat.admin()
                )
                assert resp.status_code == 201, resp.text  # the state change is committed
                vault_id = resp.json()["vault_id"]
            except httpx.RemoteProtocolError:
                # On a busy machine the relay can reach the crash point (the process is killed)
                # before the answer went out: the change was committed all the same (the relay
                # only sees committed rows); the vault is found by its name after the restart.
                pass

        async def killed() -> bool:
            return not proc.alive()

        await eventually(killed, timeout=20, what="the relay to reach the crash point")
        assert proc.popen is not None and proc.popen.returncode == -9
        published = [r for r in await read_all(stack.kafka, topic) if name in r.value.decode()]
        if crash_at == "outbox.before_publish":
            assert published == [], "nothing may be published before the crash point"

        proc.start()  # no crash point this time
        if vault_id is None:
            async with httpx.AsyncClient(timeout=10) as http:

                async def listed() -> str | None:
                    got = await http.get(f"{proc.url}/v1/vaults", headers=plat.admin())
                    if got.status_code != 200:
                        return None
                    found = [v["vault_id"] for v in got.json() if v["name"] == name]
                    return found[0] if found else None

                vault_id = await eventually(listed, timeout=30, what="the committed vault")
        records = await wait_for_records(
            stack.kafka,
            topic,
            lambda r: (
                r.json()["type"] == "VaultCreated" and r.json()["payload"]["vault_id"] == vault_id
            ),
        )
        event_ids = {r.json()["event_id"] for r in records}
        assert len(event_ids) == 1, "a re-publish carries the same event id (consumers dedupe)"
        async with httpx.AsyncClient(timeout=10) as http:
            got = await http.get(f"{proc.url}/v1/vaults/{vault_id}", headers=plat.admin())
        assert got.status_code == 200 and got.json()["name"] == name
    finally:
        proc.stop()
        await delete_prefixed_topics(stack.kafka, plat.prefix)

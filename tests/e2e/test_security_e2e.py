"""Attacks on the platform's trust boundary, each against the real services, Kafka and
PostgreSQL, each shown refused with nothing changed: recovery plan scripts, answers from who was
not asked, inventory of another vault, oversize and bomb blocks, path traversal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_failover_e2e import finished, start, task_named
from tests.support.dr import DrSetup
from tests.support.platform import Platform
from tests.support.poll import eventually

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

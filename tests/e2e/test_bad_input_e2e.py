"""Bad input through the gateway: every malformed request gets the API's JSON error (a 4xx
whose message says what to fix), from the services or from the gateway itself, and no service
logs a traceback while answering them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kit.platform import Platform
from kit.poll import eventually
from kit.procs import free_port
from scripts.gateway import Gateway, nginx_binary
from tests.e2e.test_security_e2e import script_plan

pytestmark = pytest.mark.e2e

SERVICES = ("registration", "inventory", "policy", "replication", "failover")


@pytest.fixture(scope="module")
def gateway(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (Debian package: nginx); CI must have it")
        pytest.skip("nginx is not installed (Debian package: nginx)")
    for name in SERVICES:
        platform.start(name)
    upstreams = {n: f"127.0.0.1:{platform.services[n].port}" for n in SERVICES}
    gw = Gateway(upstreams, tmp_path_factory.mktemp("gateway"), free_port()).start()
    try:
        yield gw
    finally:
        gw.stop()


def json_error(resp: httpx.Response, status: int, *needles: str) -> str:
    assert resp.status_code == status, f"{resp.status_code}: {resp.text[:300]}"
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    error = resp.json()["error"]
    assert error["status"] == status
    message = str(error["message"])
    for needle in needles:
        assert needle in message, message
    return message


async def test_bad_input_gets_a_json_4xx_saying_what_to_fix(
    platform: Platform, gateway: Gateway, http: httpx.AsyncClient
) -> None:
    logs = {n: platform.services[n].log_path for n in SERVICES}
    sizes = {n: p.stat().st_size for n, p in logs.items()}
    vault = await platform.new_vault(http, "bad")
    v = vault["vault_id"]
    admin = {"Authorization": f"Bearer {await platform.new_token(http, v, 'admin')}"}
    base = f"{gateway.url}/v1/vaults/{v}"
    item = uuid.uuid4()

    async def token_known_everywhere() -> bool:
        for path in ("/policies", "/vms", "/protected-items", "/jobs"):
            if (await http.get(base + path, headers=admin)).status_code != 200:
                return False
        return True

    await eventually(token_known_everywhere, timeout=30, what="the new token reaches every service")

    # NUL and control characters in JSON bodies, wherever they go
    bodies: list[tuple[str, dict[str, Any], str]] = [
        ("/policies", {"name": "gold\u0000"}, "name"),
        ("/recovery-plans", {"name": "plan", "description": "x\u0000y", "groups": []}, "desc"),
        (f"/protected-items/{item}/recovery-points/1/materialise", {"target_dir": "/t\u0000"}, ""),
        ("/protected-items", {"vm_id": "vm\u001b[2J"}, "vm_id"),
        ("/recovery-plans", script_plan("nul", "x\u0000.sh"), "script"),
        ("/tokens", {"name": "ops\u0007", "role": "reader"}, "name"),
    ]
    for path, body, field in bodies:
        resp = await http.post(base + path, json=body, headers=admin)
        json_error(resp, 422, "control character", field)

    # integers beyond what the database stores, in queries and bodies
    for path in ("/protected-items", "/vms"):
        resp = await http.get(base + path, params={"offset": str(10**30)}, headers=admin)
        json_error(resp, 422, "'offset'", "out of range")
    resp = await http.post(
        f"{base}/failovers/{item}/test-failover",
        json={"choice": "chosen", "cycle_seq": 2**63},
        headers=admin,
    )
    json_error(resp, 422, "cycle_seq", "out of range")
    resp = await http.get(base + "/vms", params={"name": "db\x1b"}, headers=admin)
    json_error(resp, 422, "'name'", "U+001B")

    # paths checked when the policy is saved, not when an agent uses them
    resp = await http.post(
        base + "/policies",
        json={
            "name": "offline",
            "settings": {
                "initial_replication": "offline",
                "offline_export_path": "../../../etc",
                "offline_import_path": "/imports",
            },
        },
        headers=admin,
    )
    json_error(resp, 422, "offline_export_path must be an absolute path")

    # a script checked when the plan is saved, not when a failover runs it
    plain = f"plain-{v[:8]}.sh"
    (platform.scripts_dir / plain).write_text("#!/bin/sh\n")
    resp = await http.post(
        base + "/recovery-plans", json=script_plan("plain", plain), headers=admin
    )
    json_error(resp, 422, "not executable")

    # the gateway's own refusals, in the same JSON shape
    resp = await http.get(f"{gateway.url}/v1/vaults/{v}/vm%00s", headers=admin)
    json_error(resp, 400, "malformed")
    resp = await http.get(base + "/vms", headers={"Authorization": "Bearer " + "a" * 10_000})
    json_error(resp, 400, "header too large")
    resp = await http.post(
        base + "/policies",
        content=b" " * (20 * 1024 * 1024),
        headers={**admin, "content-type": "application/json"},
    )
    json_error(resp, 413, "too large")
    resp = await http.get(f"{gateway.url}/v1/{'a' * 9000}", headers=admin)
    json_error(resp, 414, "too long")

    for name, path in logs.items():
        with path.open("rb") as log:
            log.seek(sizes[name])
            written = log.read()
        assert b"Traceback" not in written, f"{name} logged a traceback:\n{written[-3000:]!r}"
        assert b'"status": 500' not in written and b"Internal Server Error" not in written

"""One base URL: registration, inventory and policy as processes over the real Kafka and
PostgreSQL, a real nginx (the gateway of deploy/nginx) rendered with their random ports in
front of them, and `drctl` driven through the gateway URL alone (`DR_URL`), as an operator would.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kit.platform import Platform
from kit.poll import eventually
from kit.procs import REPO, free_port
from scripts.gateway import Gateway, nginx_binary
from tests.support.cli import run_drctl

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (Debian package: nginx); CI must have it")
        pytest.skip("nginx is not installed (Debian package: nginx)")
    for name in ("registration", "inventory", "policy"):
        platform.start(name)
    upstreams = {n: f"127.0.0.1:{p.port}" for n, p in platform.services.items()}
    # failover stays absent behind this gateway (a free port nobody listens on), whatever
    # other tests of the session have started
    upstreams["failover"] = f"127.0.0.1:{free_port()}"
    gw = Gateway(upstreams, tmp_path_factory.mktemp("gateway"), free_port()).start()
    try:
        yield gw
    finally:
        gw.stop()


async def drctl(url: str, token: str, *args: str, vault: str | None = None) -> tuple[int, Any, str]:
    """`python -m services.cli` with nothing but the gateway URL and a token."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("DR_") and k.endswith("_URL")) and k not in ("DR_VAULT", "DR_TOKEN")
    }
    env.update({"DR_URL": url, "DR_TOKEN": token})
    if vault:
        env["DR_VAULT"] = vault
    code, text, err = await run_drctl(env, *args)
    data: Any = json.loads(text) if "--json" in args and code == 0 else text
    return code, data, err


async def test_drctl_through_the_gateway(
    platform: Platform, gateway: Gateway, http: httpx.AsyncClient
) -> None:
    admin = platform.admin_token
    name = f"gw-{secrets.token_hex(4)}"
    rc, vault, err = await drctl(gateway.url, admin, "vault", "create", name, "--json")
    assert rc == 0, err
    vault_id = vault["vault_id"]

    rc, vaults, err = await drctl(gateway.url, admin, "vault", "list", "--json")
    assert rc == 0, err
    assert vault_id in {v["vault_id"] for v in vaults}

    rc, token, err = await drctl(
        gateway.url, admin, "token", "create", "ops", "--role", "admin", "--json", vault=vault_id
    )
    assert rc == 0, err
    op = token["token"]

    # registration (sites are producers) and inventory (clouds) through one URL
    rc, sites, err = await drctl(gateway.url, op, "site", "list", "--json", vault=vault_id)
    assert rc == 0, err
    assert sites == []

    # inventory learns of the new token from registration's events, a moment later
    async def clouds_listed() -> tuple[int, Any, str] | None:
        answer = await drctl(gateway.url, op, "inventory", "clouds", "--json", vault=vault_id)
        return answer if answer[0] == 0 else None

    rc, clouds, err = await eventually(clouds_listed, timeout=30, what="the token at inventory")
    assert clouds == [] or isinstance(clouds, (list, dict))

    # policy
    rc, created, err = await drctl(
        gateway.url,
        op,
        "policy",
        "create",
        "gold",
        "--copy-frequency",
        "30",
        "--json",
        vault=vault_id,
    )
    assert rc == 0, err
    assert created["name"] == "gold"
    rc, policies, err = await drctl(gateway.url, op, "policy", "list", "--json", vault=vault_id)
    assert rc == 0, err
    assert [p["name"] for p in policies] == ["gold"]
    rc, pairings, err = await drctl(gateway.url, op, "pairing", "list", "--json", vault=vault_id)
    assert rc == 0, err
    assert pairings == []

    # a bad token is refused by the service behind the gateway, with its own message
    rc, _, err = await drctl(gateway.url, "drt_not-a-token", "vault", "list")
    assert rc == 1
    assert "(401)" in err
    resp = await http.get(
        f"{gateway.url}/v1/vaults/{vault_id}/policies",
        headers={"Authorization": "Bearer drt_not-a-token"},
    )
    assert resp.status_code == 401
    assert resp.json()["error"]["status"] == 401


async def test_gateway_routes_serves_openapi_and_reports_absent_services(
    platform: Platform, gateway: Gateway, http: httpx.AsyncClient
) -> None:
    doc = (await http.get(f"{gateway.url}/openapi.json")).json()
    assert doc == json.loads((REPO / "deploy" / "nginx" / "openapi.json").read_text())
    assert "/v1/vaults/{vault_id}/policies" in doc["paths"]

    for name in ("registration", "inventory", "policy"):
        resp = await http.get(f"{gateway.url}/ops/{name}/healthz")
        assert resp.status_code == 200, resp.text
        assert resp.json()["service"] == name
        metrics = await http.get(f"{gateway.url}/ops/{name}/metrics")
        assert "dr_http_requests_total" in metrics.text

    # failover is not running here: a clear JSON 502, not a hang or an HTML page
    resp = await http.get(
        f"{gateway.url}/v1/vaults/{secrets.token_hex(4)}/jobs", headers=platform.admin()
    )
    assert resp.status_code == 502
    assert "unavailable" in resp.json()["error"]["message"]
    resp = await http.get(f"{gateway.url}/nowhere")
    assert resp.status_code == 404
    access_log = (gateway.state_dir / "access.log").read_bytes()
    assert b"GET /nowhere" in access_log

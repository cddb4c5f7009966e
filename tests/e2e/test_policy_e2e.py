"""Policies, cloud pairings, network mappings and prerequisite checks end to end: registration
and policy services as processes over real Kafka and PostgreSQL, a registered site provider
whose signed heartbeats make it Connected, inventory published as the inventory service would
(valid `inventory.events.v1` envelopes), driven through the CLI (`python -m services.cli`) and
over HTTP, with every rule broken once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from kit.platform import Platform
from kit.poll import eventually
from shared import topics
from shared.edge import SignedPublisher, heartbeat_loop
from shared.edge_identity import EdgeSettings, Identity, register
from shared.kafka.producer import KafkaProducer
from shared.schemas import inventory as inv
from shared.schemas.envelope import EventPayload, new_envelope
from shared.schemas.registration import ProducerKind
from tests.support.cli import run_drctl
from tests.support.kafka import produce, wait_for_records

pytestmark = pytest.mark.e2e


@dataclass
class Cli:
    """`python -m services.cli` as a subprocess, the way an operator runs it."""

    env: dict[str, str]

    async def run(self, *args: str, token: str | None = None) -> tuple[int, Any, str]:
        env = {**os.environ, **self.env}
        if token is not None:
            env["DR_TOKEN"] = token
        code, text, err = await run_drctl(env, *args)
        data: Any = json.loads(text) if "--json" in args and code == 0 else text
        return code, data, err


@dataclass
class Sites:
    """The inventory of two sites, with random ids, published as inventory events."""

    vault: str
    primary: uuid.UUID
    recovery: uuid.UUID
    tag: str = field(default_factory=lambda: secrets.token_hex(3))

    def id(self, name: str) -> str:
        return f"{name}-{self.tag}"

    def events(self) -> list[tuple[uuid.UUID, EventPayload]]:
        p, r, i = self.primary, self.recovery, self.id
        subnet = [inv.Subnet(name="app", cidr="10.0.0.0/24")]
        out: list[tuple[uuid.UUID, EventPayload]] = []

        def add(provider: uuid.UUID, site: str, kind: str, obj: EventPayload) -> None:
            model = {
                "cloud": inv.CloudChanged,
                "host": inv.HostChanged,
                "vm": inv.VmChanged,
                "network": inv.NetworkChanged,
            }[kind]
            payload = model.model_validate(
                {
                    "provider_id": provider,
                    "site": site,
                    "change": "added",
                    f"{kind}_id": getattr(obj, f"{kind}_id"),
                    kind: obj.model_dump(),
                }
            )
            out.append((provider, payload))

        add(
            p,
            "primary",
            "network",
            inv.VmNetwork(network_id=i("net-p"), name="corp", subnets=subnet),
        )
        for name, groups in (("src", ["hg"]), ("empty", []), ("mixed", ["hg"])):
            add(p, "primary", "cloud", inv.Cloud(cloud_id=i(name), name=name, host_groups=groups))
        for host, cloud, os_version in (("h-src", "src", "2022"), ("h-mixed", "mixed", "2019")):
            add(
                p,
                "primary",
                "host",
                inv.Host(
                    host_id=i(host),
                    name=host,
                    cloud_id=i(cloud),
                    host_group="hg",
                    os_version=os_version,
                ),
            )
        add(
            p,
            "primary",
            "vm",
            inv.Vm(
                vm_id=i("web"),
                name="web",
                cloud_id=i("src"),
                host_id=i("h-src"),
                disks=[inv.Disk(disk_id=i("web-d0"), name="os.vhdx", size_bytes=2**30)],
                nics=[inv.Nic(nic_id="n0", network_id=i("net-p"))],
            ),
        )
        add(
            p,
            "primary",
            "vm",
            inv.Vm(
                vm_id=i("big"),
                name="big",
                cloud_id=i("src"),
                host_id=i("h-src"),
                disks=[
                    inv.Disk(
                        disk_id=i(f"big-d{n}"), name=f"d{n}", size_bytes=2**30, encrypted=n == 3
                    )
                    for n in range(17)
                ],
            ),
        )
        for name in ("net-r", "net-r2"):
            add(
                r,
                "recovery",
                "network",
                inv.VmNetwork(network_id=i(name), name=name, subnets=subnet),
            )
        for name in ("tgt", "tgt2"):
            add(r, "recovery", "cloud", inv.Cloud(cloud_id=i(name), name=name, host_groups=["hg"]))
            add(
                r,
                "recovery",
                "host",
                inv.Host(
                    host_id=i(f"h-{name}"),
                    name=f"h-{name}",
                    cloud_id=i(name),
                    host_group="hg",
                    os_version="2022",
                ),
            )
        nowhere = uuid.uuid4()
        add(
            nowhere,
            "nowhere",
            "cloud",
            inv.Cloud(cloud_id=i("far"), name="far", host_groups=["hg"]),
        )
        # Last of each provider's partition: once the policy service knows these, it knows all.
        for provider, site in ((p, "primary"), (r, "recovery"), (nowhere, "nowhere")):
            vm = inv.Vm(vm_id=i(f"last-{site}"), name="last", cloud_id=i("x"), host_id=i("x"))
            add(provider, site, "vm", vm)
        return out


async def provider_identity(platform: Platform, key: str, site: str) -> Identity:
    settings = EdgeSettings(
        registration_url=platform.url("registration"),
        registration_key=SecretStr(key),
        name=f"vmm-{site}-{secrets.token_hex(3)}",
        site=site,
        heartbeat_seconds=1.0,
    )
    return await register(settings, ProducerKind.PROVIDER, {})


@contextlib.asynccontextmanager
async def heartbeats(platform: Platform, identity: Identity) -> AsyncIterator[None]:
    """The provider's signed heartbeats every second, for as long as the block runs."""
    producer = KafkaProducer(platform.stack.kafka, platform.prefix, "e2e-provider")
    await producer.start()
    task = asyncio.create_task(heartbeat_loop(SignedPublisher(producer, identity), 1.0))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.stop()


def error_of(resp: httpx.Response) -> str:
    return str(resp.json()["error"]["message"])


async def test_policy_pairing_mapping_and_prerequisites(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    platform.start("registration")
    platform.start("policy")
    reg_url, pol_url = platform.url("registration"), platform.url("policy")
    vault = (await platform.new_vault(http, "policy"))["vault_id"]
    admin = await platform.new_token(http, vault, "admin")
    operator = await platform.new_token(http, vault, "operator")
    reader = await platform.new_token(http, vault, "reader")
    other_vault = (await platform.new_vault(http, "other"))["vault_id"]
    stranger = await platform.new_token(http, other_vault, "admin")
    cli = Cli({"DR_REGISTRATION_URL": reg_url, "DR_POLICY_URL": pol_url, "DR_VAULT": vault})
    base = f"{pol_url}/v1/vaults/{vault}"

    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def tokens_known() -> bool:
        for token in (admin, operator, reader):
            resp = await http.get(f"{base}/policies", headers=auth(token))
            if resp.status_code != 200:
                return False
        return True

    await eventually(tokens_known, what="policy service to learn the vault's tokens")

    # Sites: providers registered with a key, inventory published as the inventory service.
    key = (await platform.new_key(http, vault))["key"]
    primary = await provider_identity(platform, key, "primary")
    recovery = await provider_identity(platform, key, "recovery")
    sites = Sites(vault, primary.producer_id, recovery.producer_id)
    topic = platform.prefix + topics.INVENTORY_EVENTS
    for provider_id, payload in sites.events():
        env = new_envelope(payload, vault_id=uuid.UUID(vault), producer_id="service:inventory")
        await produce(platform.stack.kafka, topic, env.to_bytes(), key=str(provider_id))

    async def inventory_known() -> bool:
        resp = await http.post(
            f"{base}/prerequisites",
            json={"vm_ids": [sites.id(f"last-{s}") for s in ("primary", "recovery", "nowhere")]},
            headers=auth(operator),
        )
        assert resp.status_code == 200, resp.text
        return all(r["checks"][0]["status"] == "pass" for r in resp.json()["results"])

    await eventually(inventory_known, what="policy service to apply the inventory events")

    # Policies: roles, validation, creation through the CLI.
    body = {"name": "gold", "settings": {"copy_frequency_seconds": 30, "recovery_points": 4}}
    for token, why in ((reader, "role is reader"), (operator, "role is operator")):
        resp = await http.post(f"{base}/policies", json=body, headers=auth(token))
        assert resp.status_code == 403 and why in error_of(resp), resp.text
    resp = await http.post(f"{base}/policies", json=body, headers=auth(stranger))
    assert resp.status_code == 403 and "another vault" in error_of(resp)
    resp = await http.get(f"{base}/policies", headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401
    code, _, err = await cli.run(
        "policy",
        "create",
        "bad",
        "--recovery-points",
        "2",
        "--app-consistent-hours",
        "5",
        token=admin,
    )
    assert code == 1 and "must be less than recovery_points" in err, err
    code, _, err = await cli.run(
        "policy",
        "create",
        "bad",
        "--initial-replication",
        "offline",
        "--export-path",
        "/e",
        token=admin,
    )
    assert code == 1 and "offline needs offline_import_path" in err, err
    code, _, err = await cli.run("policy", "create", "bad", "--copy-frequency", "3601", token=admin)
    assert code == 1 and "from 1 to 3600" in err, err
    code, _, err = await cli.run(
        "policy",
        "create",
        "bad",
        "--initial-replication",
        "online_scheduled",
        "--start-at",
        "2001-01-01T00:00:00Z",
        token=admin,
    )
    assert code == 1 and "is in the past" in err, err
    code, _, err = await cli.run("policy", "create", "gold", "--copy-frequency", "x", token=admin)
    assert code == 2 and "invalid int value" in err
    code, _, err = await cli.run("policy", "create", "gold", token=reader)
    assert code == 1 and "(403)" in err and "needs admin" in err

    code, gold, err = await cli.run(
        "policy",
        "create",
        "gold",
        "--copy-frequency",
        "30",
        "--recovery-points",
        "4",
        "--app-consistent-hours",
        "2",
        "--auth",
        "kerberos",
        "--json",
        token=admin,
    )
    assert code == 0, err
    assert gold["settings"]["port"] == 8083 and gold["settings"]["copy_frequency_seconds"] == 30
    code, _, err = await cli.run("policy", "create", "gold", token=admin)
    assert code == 1 and "already exists" in err
    code, old_os, err = await cli.run(
        "policy", "create", "old-os", "--target-os", "2016", "--json", token=admin
    )
    assert code == 0, err
    code, table, _ = await cli.run("policy", "list", token=reader)
    assert code == 0 and "gold" in table and "old-os" in table and "COPY_S" in table

    # Pairings: every rule broken once.
    async def pair(source: str, target: str, policy: str = "gold") -> httpx.Response:
        return await http.post(
            f"{base}/pairings",
            json={
                "source_cloud_id": sites.id(source),
                "target_cloud_id": sites.id(target),
                "policy": policy,
            },
            headers=auth(admin),
        )

    resp = await pair("src", "src")
    assert resp.status_code == 422 and "single-site setup needs" in error_of(resp)
    resp = await pair("src", "ghost")
    assert resp.status_code == 404 and "is not in this vault's inventory" in error_of(resp)
    resp = await pair("empty", "tgt")
    assert resp.status_code == 409 and "contains no host groups" in error_of(resp)
    resp = await pair("src", "far")
    assert resp.status_code == 409 and "no site provider is registered" in error_of(resp)
    resp = await pair("src", "tgt", "nope")
    assert resp.status_code == 404 and "policy 'nope' not found" in error_of(resp)

    async def not_connected() -> bool:
        resp = await pair("src", "tgt")
        return resp.status_code == 409 and "never connected: it must be Connected" in error_of(resp)

    await eventually(not_connected, what="the registered, silent provider to be refused")
    resp = await http.post(
        f"{base}/pairings",
        json={
            "source_cloud_id": sites.id("src"),
            "target_cloud_id": sites.id("tgt"),
            "policy": "gold",
        },
        headers=auth(operator),
    )
    assert resp.status_code == 403

    async with heartbeats(platform, recovery):

        async def mixed_os_refused() -> bool:
            resp = await pair("mixed", "tgt2")
            return resp.status_code == 409 and "different OS versions" in error_of(resp)

        await eventually(mixed_os_refused, what="target provider Connected in the policy service")
        resp = await pair("src", "tgt", "old-os")
        assert resp.status_code == 409 and "targets host OS version '2016'" in error_of(resp)

        code, sites_table, _ = await cli.run("site", "list", "--kind", "provider", token=reader)
        assert code == 0 and "Connected" in sites_table and "recovery" in sites_table

        code, pairing, err = await cli.run(
            "pairing",
            "create",
            "--source",
            sites.id("src"),
            "--target",
            sites.id("tgt"),
            "--policy",
            "gold",
            "--json",
            token=admin,
        )
        assert code == 0, err
        assert pairing["policy_name"] == "gold" and pairing["target_site"] == "recovery"
        resp = await pair("mixed", "tgt")
        assert resp.status_code == 409 and "already in pairing" in error_of(resp)
        assert "as target" in error_of(resp)

    code, _, err = await cli.run("policy", "delete", "gold", token=admin)
    assert code == 1 and "(409)" in err and "remove those pairings first" in err
    code, updated, err = await cli.run(
        "policy", "update", "gold", "--no-compression", "--json", token=admin
    )
    assert code == 0, err
    assert updated["version"] == 2 and updated["pairing_ids"] == [pairing["pairing_id"]]
    code, _, err = await cli.run("policy", "update", "gold", token=admin)
    assert code == 2 and "nothing to update" in err

    # Network mappings.
    code, _, err = await cli.run(
        "mapping",
        "create",
        "--source",
        sites.id("net-r"),
        "--target",
        sites.id("net-p"),
        token=admin,
    )
    assert code == 1 and "no cloud pairing goes from site 'recovery'" in err
    code, _, err = await cli.run(
        "mapping", "create", "--source", sites.id("net-p"), "--target", "ghost", token=admin
    )
    assert code == 1 and "(404)" in err
    resp = await http.post(
        f"{base}/network-mappings",
        json={"source_network_id": sites.id("net-p"), "target_network_id": sites.id("net-r")},
        headers=auth(operator),
    )
    assert resp.status_code == 403

    # Before the mapping the NIC would fail over unconnected: a warning, still ok.
    code, report, err = await cli.run("prereq", sites.id("web"), "--json", token=operator)
    assert code == 0, err
    checks = {c["rule"]: c for c in report["checks"]}
    assert report["ok"] and checks["networks_mapped"]["status"] == "warning"

    code, mapping, err = await cli.run(
        "mapping",
        "create",
        "--source",
        sites.id("net-p"),
        "--target",
        sites.id("net-r"),
        "--json",
        token=admin,
    )
    assert code == 0, err
    code, _, err = await cli.run(
        "mapping",
        "create",
        "--source",
        sites.id("net-p"),
        "--target",
        sites.id("net-r2"),
        token=admin,
    )
    assert code == 1 and "already mapped" in err
    code, changed, err = await cli.run(
        "mapping",
        "update",
        mapping["mapping_id"],
        "--target",
        sites.id("net-r2"),
        "--json",
        token=admin,
    )
    assert code == 0 and changed["target_network_id"] == sites.id("net-r2"), err
    code, table, _ = await cli.run("mapping", "list", token=reader)
    assert code == 0 and "recovery/net-r2" in table

    # Prerequisites: one VM through the CLI, several at once over HTTP.
    code, report, err = await cli.run("prereq", sites.id("web"), "--json", token=operator)
    assert code == 0 and report["ok"], err
    assert {c["status"] for c in report["checks"]} == {"pass"}
    code, text, _ = await cli.run("prereq", sites.id("web"), sites.id("big"), token=operator)
    assert code == 0 and "ready to protect" in text and "NOT ready to protect" in text
    resp = await http.get(
        f"{base}/prerequisites", params={"vm_id": sites.id("web")}, headers=auth(reader)
    )
    assert resp.status_code == 403 and "needs operator" in error_of(resp)
    resp = await http.post(
        f"{base}/prerequisites",
        json={"vm_ids": [sites.id("big"), "ghost"]},
        headers=auth(operator),
    )
    assert resp.status_code == 200
    big, ghost = resp.json()["results"]
    big_checks = {c["rule"]: c["status"] for c in big["checks"]}
    assert big_checks["disk_count"] == "fail" and big_checks["no_encrypted_disk"] == "fail"
    assert ghost["checks"] == [
        {
            "rule": "vm_exists",
            "status": "fail",
            "message": "VM 'ghost' is not in this vault's inventory",
        }
    ]
    resp = await http.post(f"{base}/prerequisites", json={"vm_ids": []}, headers=auth(operator))
    assert resp.status_code == 422

    # Tear down in order: mapping, pairing, then the policy can go.
    code, _, err = await cli.run("mapping", "delete", mapping["mapping_id"], token=admin)
    assert code == 0, err
    code, _, err = await cli.run("pairing", "delete", pairing["pairing_id"], token=admin)
    assert code == 0, err
    code, table, _ = await cli.run("pairing", "list", token=reader)
    assert code == 0 and table.strip() == "(none)"
    code, _, err = await cli.run("policy", "delete", "gold", token=admin)
    assert code == 0, err
    code, _, err = await cli.run("policy", "show", "gold", token=reader)
    assert code == 1 and "(404)" in err

    # Every change went out on policy.events.v1, keyed by the vault.
    wanted = [
        "PolicyCreated",
        "CloudPairingCreated",
        "PolicyUpdated",
        "NetworkMappingCreated",
        "NetworkMappingChanged",
        "NetworkMappingRemoved",
        "CloudPairingRemoved",
        "PolicyDeleted",
    ]
    records = await wait_for_records(
        platform.stack.kafka,
        platform.prefix + topics.POLICY_EVENTS,
        lambda r: r.key == vault,
        count=len(wanted) + 1,  # + the old-os policy
    )
    types = [r.json()["type"] for r in records]
    assert [t for t in types if t in wanted and t != "PolicyCreated"] == wanted[1:]
    assert types.count("PolicyCreated") == 2
    assert old_os["policy_id"] in {
        r.json()["payload"]["policy"]["policy_id"]
        for r in records
        if "policy" in r.json()["payload"]
    }


async def test_cli_vaults_tokens_and_keys(platform: Platform, http: httpx.AsyncClient) -> None:
    platform.start("registration")
    platform.start("policy")
    cli = Cli({"DR_URL": platform.url("registration")})
    name = f"cli-{secrets.token_hex(4)}"
    code, vault, err = await cli.run("vault", "create", name, "--json", token=platform.admin_token)
    assert code == 0, err
    code, _, err = await cli.run("vault", "create", name, token=platform.admin_token)
    assert code == 1 and "already exists" in err
    code, table, _ = await cli.run("vault", "list", token=platform.admin_token)
    assert code == 0 and name in table and "VAULT_ID" in table
    v = ["--vault", vault["vault_id"]]
    code, token, err = await cli.run(
        "token", "create", "ops", "--role", "operator", "--json", *v, token=platform.admin_token
    )
    assert code == 0 and token["token"].startswith("drt_"), err
    code, table, _ = await cli.run("token", "list", *v, token=platform.admin_token)
    assert code == 0 and token["token_id"] in table
    code, _, err = await cli.run("token", "list", *v, token=token["token"])
    assert code == 1 and "(403)" in err
    code, _, err = await cli.run(
        "token", "revoke", token["token_id"], *v, token=platform.admin_token
    )
    assert code == 0, err
    code, key, err = await cli.run("key", "create", "--json", *v, token=platform.admin_token)
    assert code == 0 and key["key"], err
    code, _, err = await cli.run("key", "revoke", key["key_id"], *v, token=platform.admin_token)
    assert code == 0, err
    code, table, _ = await cli.run("key", "list", *v, token=platform.admin_token)
    assert code == 0 and key["key_id"] in table
    code, _, err = await cli.run("token", "list", token=platform.admin_token)
    assert code == 2 and "needs a vault" in err


async def test_cli_inventory_lists(platform: Platform, http: httpx.AsyncClient) -> None:
    platform.start("registration")
    platform.start("inventory")
    vault = (await platform.new_vault(http, "inv"))["vault_id"]
    reader = await platform.new_token(http, vault, "reader")
    cli = Cli(
        {
            "DR_URL": platform.url("registration"),
            "DR_INVENTORY_URL": platform.url("inventory"),
            "DR_VAULT": vault,
        }
    )

    async def token_known() -> tuple[int, Any, str] | None:
        result = await cli.run("inventory", "clouds", "--json", token=reader)
        assert result[0] == 0, result[2]
        return result

    code, clouds, _ = await eventually(token_known, what="inventory to learn the token")
    assert clouds == []
    code, page, err = await cli.run("inventory", "vms", "--limit", "5", "--json", token=reader)
    assert code == 0 and page["items"] == [] and page["limit"] == 5, err
    code, text, _ = await cli.run("inventory", "networks", token=reader)
    assert code == 0 and text.strip() == "(none)"
    code, _, err = await cli.run("inventory", "hosts", "--site", "nowhere", token=reader)
    assert code == 1 and "(400)" in err and "no site 'nowhere'" in err

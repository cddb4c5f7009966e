"""Inventory end to end: site providers (real processes) discover their sites from the site
description and the hosts' storage folders; the inventory service (real process) applies their
signed snapshots and changes, serves them over REST and emits inventory events; records that
are malformed, unsigned, forged, for another vault or stale change nothing."""

from __future__ import annotations

import secrets
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kit.platform import Platform
from kit.poll import eventually
from kit.procs import Proc
from services.site_provider.domain import object_id
from shared import signing, topics
from shared.edge_identity import Identity, load_identity
from shared.schemas.envelope import Envelope, new_envelope
from shared.schemas.inventory import DiscoverySnapshot, Inventory
from tests.support.kafka import Record, produce, wait_for_records

pytestmark = pytest.mark.e2e

SITES = Path(__file__).resolve().parents[2] / "deploy" / "sites"


class InventoryApi:
    def __init__(self, http: httpx.AsyncClient, plat: Platform, vault_id: str, token: str):
        self.http = http
        self.base = f"{plat.url('inventory')}/v1/vaults/{vault_id}"
        self.headers = {"Authorization": f"Bearer {token}"}

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.http.get(f"{self.base}{path}", params=params, headers=self.headers)

    async def ok(self, path: str, **params: Any) -> Any:
        resp = await self.get(path, **params)
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def vm_names(self, **params: Any) -> set[str]:
        page = await self.ok("/vms", limit=500, **params)
        return {vm["name"] for vm in page["items"]}


def start_provider(
    platform: Platform, key: str, site: str, site_file: Path, storage: Path, **extra: str
) -> Proc:
    env = {
        "DR_PROVIDER_REGISTRATION_KEY": key,
        "DR_PROVIDER_REGISTRATION_URL": platform.url("registration"),
        "DR_PROVIDER_NAME": f"vmm-{site}-{secrets.token_hex(3)}",
        "DR_PROVIDER_SITE": site,
        "DR_PROVIDER_SITE_FILE": str(site_file),
        "DR_PROVIDER_STORAGE_ROOT": str(storage),
        "DR_PROVIDER_DISCOVERY_INTERVAL_SECONDS": "0.3",
        "DR_PROVIDER_HEARTBEAT_SECONDS": "1",
        **{f"DR_PROVIDER_{k}": v for k, v in extra.items()},
    }
    label = f"provider-{site}-{secrets.token_hex(3)}"
    return platform.edge("services.site_provider", "DR_PROVIDER_", label, env).start()


def identity_of(proc: Proc) -> Identity:
    identity = load_identity(Path(proc.env["DR_PROVIDER_STATE_DIR"]))
    assert identity is not None
    return identity


async def test_sites_are_discovered_served_and_kept_up_to_date(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    platform.start("registration")
    platform.start("inventory")
    vault = await platform.new_vault(http, "inventory")
    api = InventoryApi(
        http,
        platform,
        vault["vault_id"],
        await platform.new_token(http, vault["vault_id"], "reader"),
    )
    key = (await platform.new_key(http, vault["vault_id"]))["key"]
    scope = f"{vault['vault_id']}/primary"  # object ids are scoped by vault and site
    primary_file = tmp_path / "primary.yaml"
    shutil.copy(SITES / "primary.yaml", primary_file)
    storage = tmp_path / "storage"
    # a tiny part budget: the primary snapshot travels split in parts
    primary = start_provider(
        platform, key, "primary", primary_file, storage, MAX_PART_BYTES="10000"
    )
    recovery = start_provider(
        platform, key, "recovery", SITES / "recovery.yaml", tmp_path / "r-storage"
    )

    async def both_sites() -> list[dict[str, Any]] | None:
        resp = await api.get("/sites")
        sites = resp.json() if resp.status_code == 200 else []
        return sites if sorted((s["site"], s["vms"]) for s in sites) == [
            ("primary", 20), ("recovery", 2)
        ] else None  # fmt: skip

    sites = await eventually(both_sites, timeout=60, what="both sites' inventory")
    by_site = {s["site"]: s for s in sites}
    assert (by_site["primary"]["clouds"], by_site["primary"]["hosts"]) == (2, 3)
    assert by_site["recovery"]["networks"] == 2
    assert by_site["primary"]["last_snapshot_sequence"] is not None

    # -- the REST API: filters, paging, one VM, errors ------------------------------------
    clouds = await api.ok("/clouds")
    assert sorted(c["name"] for c in clouds) == [
        "Gold-Primary", "Gold-Recovery", "Silver-Primary", "Silver-Recovery"
    ]  # fmt: skip
    gold = next(c for c in clouds if c["name"] == "Gold-Primary")
    assert (gold["site"], gold["host_groups"]) == ("primary", ["HG-Gold-Primary"])
    assert gold["provider_id"] == str(identity_of(primary).producer_id)
    hosts = await api.ok("/hosts", cloud="Gold-Primary")
    assert sorted(h["name"] for h in hosts) == ["hv-p1", "hv-p2"]
    assert {h["os_version"] for h in hosts} == {"Windows Server 2022"}
    assert [h["name"] for h in await api.ok("/hosts", cloud=gold["cloud_id"])] == ["hv-p1", "hv-p2"]
    assert len(await api.ok("/hosts", site="recovery")) == 3
    assert len(await api.vm_names(cloud="Silver-Primary")) == 8
    assert await api.vm_names(name="SQL") == {"sql-01", "sql-02", "sql-03", "sql-04"}
    assert len(await api.vm_names(host="hv-p1", site="primary")) == 6
    page = await api.ok("/vms", site="primary", limit=5, offset=5)
    assert (page["total"], len(page["items"]), page["limit"], page["offset"]) == (20, 5, 5, 5)
    assert [vm["name"] for vm in page["items"]] == [
        "app-06",
        "app-07",
        "app-08",
        "sql-01",
        "sql-02",
    ]
    beyond = await api.ok("/vms", site="primary", offset=100)
    assert (beyond["total"], beyond["items"]) == (20, [])
    sql = await api.ok(f"/vms/{object_id(scope, 'vm', 'sql-01')}")
    assert [d["name"] for d in sql["disks"]] == ["os.vhdx", "data.vhdx"]
    assert sql["nics"][0]["ip_mode"] == "static"
    assert sql["nics"][0]["network_id"] == object_id(scope, "network", "Corp-Primary")
    networks = await api.ok("/networks", site="recovery")
    assert {n["name"]: n["isolated"] for n in networks} == {
        "Corp-Recovery": False, "Test-Recovery": True
    }  # fmt: skip
    for path, params, status, message in (
        ("/vms", {"limit": 0}, 422, "limit"),
        ("/vms", {"limit": 501}, 422, "limit"),
        ("/vms", {"offset": -1}, 422, "offset"),
        ("/vms", {"cloud": "Platinum"}, 400, "no cloud with id or name 'Platinum'"),
        ("/vms", {"host": "nohost"}, 400, "no host with id or name 'nohost'"),
        ("/hosts", {"site": "mars"}, 400, "no site 'mars'"),
        ("/vms", {"clod": "Gold-Primary"}, 400, "unknown query parameter 'clod'"),
        ("/vms/not a vm", {}, 422, "vm_id"),
        (f"/vms/{uuid.uuid4()}", {}, 404, "not found"),
    ):
        resp = await api.get(path, **params)
        assert resp.status_code == status, (path, params, resp.text)
        assert message in resp.json()["error"]["message"], resp.text
    assert (await http.get(f"{api.base}/vms")).status_code == 401
    other = await platform.new_vault(http, "other")
    other_token = await platform.new_token(http, other["vault_id"], "reader")
    outsider = InventoryApi(http, platform, vault["vault_id"], other_token)
    resp = await eventually(
        lambda: _not_401(outsider.get("/vms")), what="the other vault's token to be known"
    )
    assert resp.status_code == 403

    # -- a VM folder appears on a host's storage: discovered with its real disk -----------
    folder = storage / "hv-p3" / "restored-01"
    folder.mkdir(parents=True)
    (folder / "vm.json").write_text(
        '{"generation": 1, "cpu": 4, "nics": [{"network": "Corp-Primary"}]}'
    )
    (folder / "system.vhdx").write_bytes(b"\0" * 123_456)

    async def restored() -> dict[str, Any] | None:
        page = await api.ok("/vms", name="restored")
        return page["items"][0] if page["items"] else None

    vm = await eventually(restored, what="the VM found on hv-p3's storage")
    assert (vm["generation"], vm["cpu_count"], vm["host_id"]) == (
        1, 4, object_id(scope, "host", "hv-p3")
    )  # fmt: skip
    assert [(d["name"], d["size_bytes"]) for d in vm["disks"]] == [("system.vhdx", 123_456)]

    # -- records that must change nothing -------------------------------------------------
    ident = identity_of(primary)
    bootstrap = platform.stack.kafka
    discovery = f"{platform.prefix}{topics.INVENTORY_DISCOVERY}"
    empty = DiscoverySnapshot(site="primary", sequence=2**62, inventory=Inventory())

    def mine(payload: DiscoverySnapshot, vault_id: uuid.UUID = ident.vault_id) -> Envelope:
        return new_envelope(payload, vault_id=vault_id, producer_id=str(ident.producer_id))

    def signed(env: Envelope, key: Ed25519PrivateKey) -> bytes:
        return env.signed_with(key).to_bytes()

    forged_key = signing.new_private_key()
    # the recovery site's provider: a producer of the same vault, not this one
    neighbours_key = identity_of(recovery).signing_key
    # what a reader of registration.events.v1 has, used as a private key
    published_key = signing.load_private_key(ident.public_key)
    bad: dict[str, tuple[bytes, str]] = {
        "malformed": (
            mine(empty)
            .signed_with(ident.signing_key)
            .model_copy(update={"payload": {"site": "primary", "sequence": "soon"}})
            .to_bytes(),
            "invalid_payload",
        ),
        "garbage": (b"{not json", "malformed_json"),
        "unsigned": (mine(empty).to_bytes(), "unsigned"),
        "forged": (signed(mine(empty), forged_key), "bad_signature"),
        "neighbours-key": (signed(mine(empty), neighbours_key), "bad_signature"),
        "published-key": (signed(mine(empty), published_key), "bad_signature"),
        "other-vault": (
            signed(mine(empty, uuid.UUID(other["vault_id"])), ident.signing_key),
            "vault_mismatch",
        ),
    }
    tag = secrets.token_hex(3)
    for name, (value, _) in bad.items():
        await produce(bootstrap, discovery, value, key=f"{name}-{tag}")
    stale = DiscoverySnapshot(site="primary", sequence=1, inventory=Inventory())
    await produce(
        bootstrap,
        discovery,
        signed(mine(stale), ident.signing_key),
        key=str(ident.producer_id),
    )

    dead = await wait_for_records(
        bootstrap,
        f"{discovery}.dlq",
        lambda r: (r.key or "").endswith(f"-{tag}"),
        count=len(bad),
        timeout=60,
    )
    reasons = {(r.key or "").removesuffix(f"-{tag}"): r.headers["dlq.reason"] for r in dead}
    assert reasons == {name: reason for name, (_, reason) in bad.items()}

    async def stale_counted() -> bool:
        sites = {s["site"]: s for s in await api.ok("/sites")}
        return bool(sites["primary"]["stale_ignored"] >= 1)

    await eventually(stale_counted, what="the stale snapshot to be ignored and counted")
    assert len(await api.vm_names(site="primary")) == 21  # nothing was removed

    # -- a VM removed from the site description disappears, with a VmChanged(removed) ----
    text = primary_file.read_text()
    primary_file.write_text(
        text.replace('name: "web-{n:02}"\n    count: 8', 'name: "web-{n:02}"\n    count: 7')
    )

    async def web_08_gone() -> bool:
        return "web-08" not in await api.vm_names(site="primary")

    await eventually(web_08_gone, what="web-08 to disappear")
    assert len(await api.vm_names(site="primary")) == 20
    web_08 = object_id(scope, "vm", "web-08")
    events = await wait_for_records(
        bootstrap, f"{platform.prefix}{topics.INVENTORY_EVENTS}", lambda r: _removed(r, web_08)
    )
    assert events[0].key == str(ident.producer_id)
    assert events[0].json()["vault_id"] == vault["vault_id"]
    resp = await api.get(f"/vms/{web_08}")
    assert resp.status_code == 404


async def _not_401(request: Any) -> httpx.Response | None:
    resp: httpx.Response = await request
    return resp if resp.status_code != 401 else None


def _removed(record: Record, vm_id: str) -> bool:
    event = record.json()
    payload = event.get("payload", {})
    return bool(
        event.get("type") == "VmChanged"
        and payload.get("change") == "removed"
        and payload.get("vm_id") == vm_id
        and payload.get("vm") is None
    )

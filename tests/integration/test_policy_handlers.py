"""Policy handlers against the real PostgreSQL: read models fed by applying inventory and
registration events, then the policy, pairing, mapping and prerequisite rules, with the events
each change leaves in the outbox."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from kit.stack import migrated_pool
from services.policy import domain, handlers
from services.policy import read_model_repository as reads
from services.policy.__main__ import MIGRATIONS
from services.policy.consumer import PROTECTION_HANDLERS
from shared import signing
from shared.kafka.decode import Incoming
from shared.readmodels import registration_handlers
from shared.schemas import inventory as inv
from shared.schemas import registration as reg
from shared.schemas import replication as rep
from shared.schemas.envelope import EventPayload, new_envelope
from shared.schemas.policy import ReplicationPolicySettings

pytestmark = pytest.mark.integration

HANDLERS = {
    **registration_handlers(),
    **handlers.inventory_handlers(),
    **PROTECTION_HANDLERS,
}


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with migrated_pool(database_url, "policy", MIGRATIONS) as p:
        yield p


async def apply(pool: asyncpg.Pool, vault_id: uuid.UUID, payload: EventPayload) -> None:
    """Apply one event through the consumer's handler, as the consumer would."""
    env = new_envelope(payload, vault_id=vault_id, producer_id="service:inventory")
    incoming = Incoming(env, payload, "test", 0, 0, None)
    async with pool.acquire() as conn, conn.transaction():
        await HANDLERS[env.type](conn, incoming)


@dataclass
class World:
    """One vault with a primary and a recovery site (random ids), fed through events."""

    pool: asyncpg.Pool
    vault: uuid.UUID
    primary: uuid.UUID
    recovery: uuid.UUID
    tag: str

    def id(self, name: str) -> str:
        return f"{name}-{self.tag}"

    async def cloud(self, name: str, site: str, **kw: Any) -> str:
        cloud = inv.Cloud(cloud_id=self.id(name), name=name, host_groups=["hg"], **kw)
        await apply(self.pool, self.vault, self._ev(inv.CloudChanged, site, cloud=cloud))
        return cloud.cloud_id

    async def host(self, name: str, site: str, cloud: str, os_version: str = "2022") -> None:
        host = inv.Host(
            host_id=self.id(name), name=name, cloud_id=cloud, host_group="hg", os_version=os_version
        )
        await apply(self.pool, self.vault, self._ev(inv.HostChanged, site, host=host))

    async def network(self, name: str, site: str) -> str:
        net = inv.VmNetwork(
            network_id=self.id(name),
            name=name,
            subnets=[inv.Subnet(name="app", cidr="10.0.0.0/24")],
        )
        await apply(self.pool, self.vault, self._ev(inv.NetworkChanged, site, network=net))
        return net.network_id

    async def vm(self, name: str, cloud: str, network: str | None = None, **kw: Any) -> str:
        vm = inv.Vm(
            vm_id=self.id(name),
            name=name,
            cloud_id=cloud,
            host_id=self.id("h1"),
            disks=kw.pop(
                "disks", [inv.Disk(disk_id=self.id(f"{name}-d0"), name="os", size_bytes=2**30)]
            ),
            nics=[inv.Nic(nic_id="n0", network_id=network)],
            **kw,
        )
        await apply(self.pool, self.vault, self._ev(inv.VmChanged, "primary", vm=vm))
        return vm.vm_id

    def _ev(self, model: type[EventPayload], site: str, **obj: Any) -> EventPayload:
        ((kind, value),) = obj.items()
        object_id = getattr(value, f"{kind}_id") if kind != "network" else value.network_id
        return model.model_validate(
            {
                "provider_id": self.primary if site == "primary" else self.recovery,
                "site": site,
                "change": "added",
                f"{kind}_id": object_id,
                kind: value.model_dump(),
            }
        )

    async def provider(self, site: str, state: reg.ConnectionState | None) -> None:
        pid = self.primary if site == "primary" else self.recovery
        await apply(
            self.pool,
            self.vault,
            reg.ProducerRegistered(
                producer_id=pid,
                kind=reg.ProducerKind.PROVIDER,
                name=f"vmm-{site}",
                site=site,
                generation=1,
                public_key=signing.public_key_hex(signing.new_private_key()),
                heartbeat_interval_seconds=5,
            ),
        )
        if state is not None:
            await apply(
                self.pool,
                self.vault,
                reg.ProducerConnectionChanged(
                    producer_id=pid,
                    kind=reg.ProducerKind.PROVIDER,
                    name=f"vmm-{site}",
                    site=site,
                    state=state,
                    previous_state=None,
                    last_heartbeat_at=None,
                    reason="test",
                ),
            )

    async def events(self, *, verdicts: bool = False) -> list[dict[str, Any]]:
        """The vault's events in the outbox: the configuration changes, or (`verdicts`) the
        prerequisite verdicts only."""
        rows = await self.pool.fetch(
            "SELECT value FROM outbox WHERE key = $1 ORDER BY id", str(self.vault)
        )
        found = [json.loads(r["value"]) for r in rows]
        return [e for e in found if (e["type"] == "PrerequisitesEvaluated") == verdicts]

    async def policy(self, name: str = "gold", **settings: Any) -> dict[str, Any]:
        return await handlers.create_policy(
            self.pool, self.vault, name, ReplicationPolicySettings.model_validate(settings)
        )


@pytest.fixture
async def world(pool: asyncpg.Pool) -> World:
    w = World(pool, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), secrets.token_hex(3))
    await w.provider("primary", reg.ConnectionState.CONNECTED)
    await w.provider("recovery", reg.ConnectionState.CONNECTED)
    return w


async def paired_world(world: World) -> tuple[str, str, dict[str, Any]]:
    src = await world.cloud("src", "primary")
    tgt = await world.cloud("tgt", "recovery", capacity_vms=1)
    await world.host("h1", "primary", src)
    await world.host("h2", "recovery", tgt)
    await world.policy()
    pairing = await handlers.create_pairing(
        world.pool, world.vault, source_cloud_id=src, target_cloud_id=tgt, policy_ref="gold"
    )
    return src, tgt, pairing


async def test_inventory_events_keep_the_read_model(world: World) -> None:
    cid = await world.cloud("c", "primary", capacity_vms=7)
    async with world.pool.acquire() as conn:
        found = await reads.get_cloud(conn, world.vault, cid)
        assert found is not None and found.site == "primary" and found.capacity_vms == 7
        assert found.provider_id == world.primary
        assert await reads.get_cloud(conn, uuid.uuid4(), cid) is None  # another vault
    await apply(
        world.pool,
        world.vault,
        inv.CloudChanged(
            provider_id=world.primary, site="primary", change="removed", cloud_id=cid, cloud=None
        ),
    )
    async with world.pool.acquire() as conn:
        assert await reads.get_cloud(conn, world.vault, cid) is None


async def test_policy_crud_with_events(world: World) -> None:
    created = await world.policy("silver", copy_frequency_seconds=30, recovery_points=4)
    assert created["settings"]["port"] == 8084 and created["version"] == 1
    with pytest.raises(domain.Conflict, match="a policy named 'silver' already exists"):
        await world.policy("silver")
    by_name = await handlers.get_policy(world.pool, world.vault, "silver")
    assert by_name["policy_id"] == created["policy_id"] and by_name["pairing_ids"] == []
    updated = await handlers.update_policy(
        world.pool,
        world.vault,
        created["policy_id"],
        name=None,
        changes={"app_consistent_frequency_hours": 2, "authentication": "kerberos"},
    )
    assert updated["version"] == 2 and updated["settings"]["port"] == 8083
    with pytest.raises(domain.Invalid, match="must be less than recovery_points"):
        await handlers.update_policy(
            world.pool, world.vault, "silver", name=None, changes={"recovery_points": 1}
        )
    with pytest.raises(domain.Invalid, match="more than 24 h ahead"):
        await handlers.update_policy(
            world.pool,
            world.vault,
            "silver",
            name=None,
            changes={
                "initial_replication": "online_scheduled",
                "initial_replication_start_at": (datetime.now(UTC) + timedelta(days=2)).isoformat(),
            },
        )
    deleted = await handlers.delete_policy(world.pool, world.vault, "silver")
    assert deleted["policy_id"] == created["policy_id"]
    with pytest.raises(domain.NotFound):
        await handlers.get_policy(world.pool, world.vault, "silver")
    types = [e["type"] for e in await world.events()]
    assert types == ["PolicyCreated", "PolicyUpdated", "PolicyDeleted"]


async def test_pairing_rules_on_the_database(world: World) -> None:
    src = await world.cloud("src", "primary")
    tgt = await world.cloud("tgt", "recovery")
    await world.host("h1", "primary", src, "2022")
    await world.host("h2", "recovery", tgt, "2019")
    await world.policy()

    async def pair(source: str, target: str, policy: str = "gold") -> dict[str, Any]:
        return await handlers.create_pairing(
            world.pool,
            world.vault,
            source_cloud_id=source,
            target_cloud_id=target,
            policy_ref=policy,
        )

    with pytest.raises(domain.NotFound, match="policy 'nope' not found"):
        await pair(src, tgt, "nope")
    with pytest.raises(domain.NotFound, match="target cloud 'ghost' is not in this vault"):
        await pair(src, "ghost")
    with pytest.raises(domain.Invalid, match="same cloud"):
        await pair(src, src)
    with pytest.raises(domain.Conflict, match="different OS versions"):
        await pair(src, tgt)
    await world.host("h2", "recovery", tgt, "2022")
    await world.policy("old-os", target_host_os_version="2016")
    with pytest.raises(domain.Conflict, match="targets host OS version '2016'"):
        await pair(src, tgt, "old-os")

    await world.provider("recovery", reg.ConnectionState.DISCONNECTED)
    with pytest.raises(domain.Conflict, match="is Disconnected: it must be Connected"):
        await pair(src, tgt)
    await world.provider("recovery", reg.ConnectionState.CONNECTED)

    no_groups = world.id("nogroups")
    await apply(
        world.pool,
        world.vault,
        inv.CloudChanged(
            provider_id=world.recovery,
            site="recovery",
            change="added",
            cloud_id=no_groups,
            cloud=inv.Cloud(cloud_id=no_groups, name="nogroups", host_groups=[]),
        ),
    )
    with pytest.raises(domain.Conflict, match="contains no host groups"):
        await pair(src, no_groups)

    pairing = await pair(src, tgt)
    assert pairing["source_site"] == "primary" and pairing["target_site"] == "recovery"
    assert pairing["policy_name"] == "gold" and pairing["source_cloud_name"] == "src"

    other = await world.cloud("other", "recovery")
    with pytest.raises(domain.Conflict, match=r"already in pairing .* as source"):
        await pair(src, other)
    with pytest.raises(domain.Conflict, match=r"already in pairing .* as target"):
        await pair(other, tgt)

    with pytest.raises(domain.Conflict, match="used by 1 cloud pairing"):
        await handlers.delete_policy(world.pool, world.vault, "gold")
    updated = await handlers.update_policy(
        world.pool, world.vault, "gold", name=None, changes={"compression": False}
    )
    assert updated["pairing_ids"] == [str(pairing["pairing_id"])]
    events = await world.events()
    policy_updated = next(e for e in events if e["type"] == "PolicyUpdated")
    assert policy_updated["payload"]["pairing_ids"] == [str(pairing["pairing_id"])]
    assert "CloudPairingCreated" in [e["type"] for e in events]


async def test_target_provider_must_be_registered(world: World) -> None:
    src = await world.cloud("src", "primary")
    nowhere = inv.Cloud(cloud_id=world.id("far"), name="far", host_groups=["hg"])
    await apply(
        world.pool,
        world.vault,
        inv.CloudChanged(
            provider_id=uuid.uuid4(),
            site="elsewhere",
            change="added",
            cloud_id=nowhere.cloud_id,
            cloud=nowhere,
        ),
    )
    await world.policy()
    with pytest.raises(domain.Conflict, match="no site provider is registered for the target"):
        await handlers.create_pairing(
            world.pool,
            world.vault,
            source_cloud_id=src,
            target_cloud_id=nowhere.cloud_id,
            policy_ref="gold",
        )


async def test_unpair_refused_while_items_are_protected(world: World) -> None:
    src, tgt, pairing = await paired_world(world)
    vm = await world.vm("web", src)
    async with world.pool.acquire() as conn:
        await reads.upsert_protected_item(conn, world.vault, vm, src, tgt, pairing["pairing_id"])
    with pytest.raises(domain.Conflict, match=r"1 VM\(s\) of source cloud .* are protected"):
        await handlers.remove_pairing(world.pool, world.vault, pairing["pairing_id"])
    async with world.pool.acquire() as conn:
        await reads.remove_protected_item(conn, world.vault, vm)
    removed = await handlers.remove_pairing(world.pool, world.vault, pairing["pairing_id"])
    assert removed["pairing_id"] == pairing["pairing_id"]
    with pytest.raises(domain.NotFound):
        await handlers.get_pairing(world.pool, world.vault, pairing["pairing_id"])
    assert [e["type"] for e in await world.events()][-1] == "CloudPairingRemoved"


async def test_network_mappings(world: World) -> None:
    a = await world.network("corp", "primary")
    b = await world.network("corp-dr", "recovery")
    c = await world.network("corp-dr2", "recovery")

    async def create(source: str, target: str) -> dict[str, Any]:
        return await handlers.create_mapping(
            world.pool, world.vault, source_network_id=source, target_network_id=target
        )

    with pytest.raises(domain.Conflict, match="no cloud pairing goes from site 'primary'"):
        await create(a, b)
    await paired_world(world)
    with pytest.raises(domain.NotFound, match="target network 'ghost'"):
        await create(a, "ghost")
    with pytest.raises(domain.Conflict, match="no cloud pairing goes from site 'recovery'"):
        await create(b, a)
    mapping = await create(a, b)
    assert mapping["source_network_name"] == "corp" and mapping["target_site"] == "recovery"
    with pytest.raises(domain.Conflict, match="already mapped"):
        await create(a, c)
    changed = await handlers.change_mapping(world.pool, world.vault, mapping["mapping_id"], c)
    assert changed["target_network_id"] == c
    await handlers.remove_mapping(world.pool, world.vault, mapping["mapping_id"])
    events = [e for e in await world.events() if e["type"].startswith("NetworkMapping")]
    assert [e["type"] for e in events] == [
        "NetworkMappingCreated",
        "NetworkMappingChanged",
        "NetworkMappingRemoved",
    ]
    assert events[1]["payload"]["previous_target_network_id"] == b


async def test_prerequisites(world: World) -> None:
    src, tgt, pairing = await paired_world(world)
    net = await world.network("corp", "primary")
    dr = await world.network("corp-dr", "recovery")
    ok_vm = await world.vm("web", src, net)
    many = await world.vm(
        "big",
        src,
        None,
        disks=[
            inv.Disk(disk_id=f"{world.tag}-b{i}", name=f"d{i}", size_bytes=2**30, shared=i == 0)
            for i in range(17)
        ],
    )

    async def report(vm_id: str) -> dict[str, str]:
        [result] = await handlers.check_many(world.pool, world.vault, [vm_id])
        return {c["rule"]: c["status"] for c in result["checks"]}

    first = await report(ok_vm)
    assert first["networks_mapped"] == "warning" and first["target_capacity"] == "pass"
    await handlers.create_mapping(
        world.pool, world.vault, source_network_id=net, target_network_id=dr
    )
    assert set((await report(ok_vm)).values()) == {"pass"}
    big = await report(many)
    assert big["disk_count"] == "fail" and big["no_shared_disk"] == "fail"

    async with world.pool.acquire() as conn:
        await reads.upsert_protected_item(conn, world.vault, ok_vm, src, tgt, pairing["pairing_id"])
    after = await report(ok_vm)
    assert after["not_protected"] == "fail" and after["target_capacity"] == "fail"  # capacity 1

    results = await handlers.check_many(world.pool, world.vault, [ok_vm, "ghost"])
    assert [r["ok"] for r in results] == [False, False]
    assert results[1]["checks"][0]["rule"] == "vm_exists"


async def test_prerequisite_verdicts_follow_their_facts(world: World) -> None:
    """A verdict per VM is emitted whenever what it depends on changes, and only then."""
    src = await world.cloud("src", "primary")
    tgt = await world.cloud("tgt", "recovery", capacity_vms=1)
    await world.host("h1", "primary", src)
    net = await world.network("corp", "primary")
    dr = await world.network("corp-dr", "recovery")
    web = await world.vm("web", src, net)
    db = await world.vm("db", src, None)
    seen = 0

    async def new_verdicts() -> dict[str, tuple[bool, list[str], int]]:
        """VM -> (ok, failed and warned rules, revision) of the verdicts emitted since last."""
        nonlocal seen
        found = await world.events(verdicts=True)
        fresh, seen = found[seen:], len(found)
        return {
            e["payload"]["vm_id"]: (
                e["payload"]["ok"],
                [c["rule"] for c in e["payload"]["checks"] if c["status"] != "pass"],
                e["payload"]["revision"],
            )
            for e in fresh
        }

    assert await new_verdicts() == {
        web: (False, ["cloud_paired", "networks_mapped", "target_capacity"], 1),
        db: (False, ["cloud_paired", "target_capacity"], 1),
    }
    await world.policy()
    pairing = await handlers.create_pairing(
        world.pool, world.vault, source_cloud_id=src, target_cloud_id=tgt, policy_ref="gold"
    )
    assert await new_verdicts() == {web: (True, ["networks_mapped"], 2), db: (True, [], 2)}
    await handlers.create_mapping(
        world.pool, world.vault, source_network_id=net, target_network_id=dr
    )
    assert await new_verdicts() == {web: (True, [], 3)}  # db has no NIC on a network
    await world.vm("db", src, None)  # the same VM again: its verdict is unchanged
    assert await new_verdicts() == {}

    protected = rep.ProtectionEnabled(
        item_id=uuid.uuid4(),
        vm_id=web,
        vm_name="web",
        source_cloud_id=src,
        target_cloud_id=tgt,
        pairing_id=pairing["pairing_id"],
        policy_id=pairing["policy_id"],
        source_agent_id=uuid.uuid4(),
    )
    await apply(world.pool, world.vault, protected)
    assert await new_verdicts() == {  # the target cloud holds one VM: now full
        web: (False, ["not_protected", "target_capacity"], 4),
        db: (False, ["target_capacity"], 3),
    }
    await apply(
        world.pool,
        world.vault,
        rep.ProtectionDisabled(item_id=protected.item_id, vm_id=web, replica_deleted=True),
    )
    assert await new_verdicts() == {web: (True, [], 5), db: (True, [], 4)}

    await apply(
        world.pool,
        world.vault,
        inv.VmChanged(
            provider_id=world.primary, site="primary", change="removed", vm_id=db, vm=None
        ),
    )
    assert await new_verdicts() == {db: (False, ["vm_exists"], 5)}
    # At start-up every VM is re-evaluated: nothing of this vault changed, nothing emitted.
    await handlers.publish_all_verdicts(world.pool)
    assert await new_verdicts() == {}

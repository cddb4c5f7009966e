"""Read-model handlers of the failover service: the events of registration, inventory, policy
and replication that keep its view of items, VMs, networks, mappings, clouds and recovery
points, and the answers (replication's materialisations, agents' `CommandCompleted`) to what it
asked. Each runs in the consumer's transaction (with the inbox row) and wakes waiting steps."""

from __future__ import annotations

import asyncpg

from services.failover import read_model_repository as read_models
from services.failover import repository as repo
from services.failover.workflow import Notifier
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming
from shared.schemas import agent, failover, inventory, policy, replication
from shared.schemas.envelope import EventPayload
from shared.schemas.registry import type_name_of


def make_event_handlers(notifier: Notifier) -> dict[str, Handler]:
    """The read models' handlers, keyed by payload type (the consumer dispatches by the
    envelope's type name)."""

    async def on_protected(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.ProtectionEnabled)
        await read_models.upsert_item(
            conn,
            inc.envelope.vault_id,
            ev.item_id,
            vm_id=ev.vm_id,
            vm_name=ev.vm_name,
            source_cloud_id=ev.source_cloud_id,
            target_cloud_id=ev.target_cloud_id,
            pairing_id=ev.pairing_id,
            source_agent_id=ev.source_agent_id,
        )
        notifier.poke()

    async def on_disabled(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.ProtectionDisabled)
        await read_models.deactivate_item(conn, inc.envelope.vault_id, ev.item_id)

    async def on_state(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.ItemStateChanged)
        await read_models.set_item_state(
            conn, inc.envelope.vault_id, ev.item_id, ev.state.value, ev.health.value
        )
        notifier.poke()

    async def on_point(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.RecoveryPointCreated)
        app = ev.point_type is replication.RecoveryPointType.APP_CONSISTENT
        await read_models.record_point(
            conn, inc.envelope.vault_id, ev.item_id, ev.cycle_seq, ev.source_time, app
        )
        notifier.poke()

    async def on_pruned(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.RecoveryPointsPruned)
        await read_models.prune_points(conn, inc.envelope.vault_id, ev.item_id, ev.cycle_seqs)

    async def on_materialised(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(
            ev, failover.RecoveryPointMaterialised | failover.RecoveryPointMaterialiseFailed
        )
        if not await repo.check_answerer(
            conn, ev.request_id, inc.envelope.vault_id, inc.envelope.producer_id
        ):
            return
        if isinstance(ev, failover.RecoveryPointMaterialised):
            await repo.save_answer(
                conn,
                ev.request_id,
                "materialise",
                True,
                "",
                ev.model_dump(
                    mode="json", include={"cycle_seq", "source_time", "app_consistent", "disks"}
                ),
            )
        else:
            await repo.save_answer(conn, ev.request_id, "materialise", False, ev.error, {})
        notifier.poke()

    async def on_completed(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, agent.CommandCompleted)
        if not await repo.check_answerer(
            conn, ev.command_id, inc.envelope.vault_id, inc.envelope.producer_id
        ):
            return  # another service's command
        await repo.save_answer(
            conn,
            ev.command_id,
            f"agent {ev.command_type}",
            ev.outcome is agent.CommandOutcome.SUCCEEDED,
            ev.error,
            ev.result,
        )
        notifier.poke()

    async def on_vm(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, inventory.VmChanged)
        if ev.vm is None:
            await read_models.remove_vm(conn, inc.envelope.vault_id, ev.vm_id, ev.site)
        else:
            await read_models.upsert_vm(
                conn, inc.envelope.vault_id, ev.vm_id, ev.site, ev.vm.model_dump(mode="json")
            )

    async def on_network(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, inventory.NetworkChanged)
        if ev.network is None:
            await read_models.remove_network(conn, inc.envelope.vault_id, ev.network_id)
        else:
            await read_models.upsert_network(
                conn,
                inc.envelope.vault_id,
                ev.network_id,
                ev.site,
                ev.network.model_dump(mode="json"),
            )

    async def on_cloud(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, inventory.CloudChanged)
        await read_models.upsert_cloud(conn, inc.envelope.vault_id, ev.cloud_id, ev.site)

    async def on_mapping(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(
            ev,
            policy.NetworkMappingCreated
            | policy.NetworkMappingChanged
            | policy.NetworkMappingRemoved,
        )
        m = ev.mapping
        await read_models.upsert_mapping(
            conn,
            inc.envelope.vault_id,
            m.mapping_id,
            m.source_network_id,
            m.target_network_id,
            isinstance(ev, policy.NetworkMappingRemoved),
        )

    by_type: dict[type[EventPayload], Handler] = {
        replication.ProtectionEnabled: on_protected,
        replication.ProtectionDisabled: on_disabled,
        replication.ItemStateChanged: on_state,
        replication.RecoveryPointCreated: on_point,
        replication.RecoveryPointsPruned: on_pruned,
        failover.RecoveryPointMaterialised: on_materialised,
        failover.RecoveryPointMaterialiseFailed: on_materialised,
        agent.CommandCompleted: on_completed,
        inventory.VmChanged: on_vm,
        inventory.NetworkChanged: on_network,
        inventory.CloudChanged: on_cloud,
        policy.NetworkMappingCreated: on_mapping,
        policy.NetworkMappingChanged: on_mapping,
        policy.NetworkMappingRemoved: on_mapping,
    }
    return {type_name_of(t)[0]: h for t, h in by_type.items()}

"""Read models of other services' events: the inventory's VMs and hosts, the policy service's
policies, cloud pairings and prerequisite verdicts (what enabling protection reads)."""

from __future__ import annotations

import asyncpg

from services.replication import read_model_repository as rm_repo
from services.replication import repository as repo
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming
from shared.schemas import inventory as inv
from shared.schemas import policy as pol


async def on_vm(conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, inv.VmChanged)
    if msg.vm is None:
        await rm_repo.remove_vm(conn, inc.envelope.vault_id, msg.vm_id)
    else:
        await rm_repo.upsert_vm(
            conn, inc.envelope.vault_id, msg.site, msg.vm.model_dump(mode="json")
        )


async def on_host(conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, inv.HostChanged)
    if msg.host is None:
        await rm_repo.remove_host(conn, inc.envelope.vault_id, msg.host_id)
    else:
        await rm_repo.upsert_host(
            conn, inc.envelope.vault_id, msg.site, msg.host.model_dump(mode="json")
        )


async def on_policy(conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, pol.PolicyCreated | pol.PolicyUpdated | pol.PolicyDeleted)
    deleted = isinstance(msg, pol.PolicyDeleted)
    await rm_repo.upsert_policy(
        conn, inc.envelope.vault_id, msg.policy.model_dump(mode="json"), deleted
    )
    if isinstance(msg, pol.PolicyUpdated):
        await repo.set_copy_interval(
            conn, msg.policy.policy_id, msg.policy.settings.copy_frequency_seconds
        )


async def on_pairing(conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, pol.CloudPairingCreated | pol.CloudPairingRemoved)
    removed = isinstance(msg, pol.CloudPairingRemoved)
    await rm_repo.upsert_pairing(
        conn, inc.envelope.vault_id, msg.pairing.model_dump(mode="json"), removed
    )


async def on_prerequisites(conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, pol.PrerequisitesEvaluated)
    await rm_repo.upsert_prerequisites(conn, inc.envelope.vault_id, msg)


def make_read_model_handlers() -> dict[str, Handler]:
    """Handlers of the read models' events, by event type."""
    return {
        "VmChanged": on_vm,
        "HostChanged": on_host,
        "PrerequisitesEvaluated": on_prerequisites,
        "PolicyCreated": on_policy,
        "PolicyUpdated": on_policy,
        "PolicyDeleted": on_policy,
        "CloudPairingCreated": on_pairing,
        "CloudPairingRemoved": on_pairing,
    }

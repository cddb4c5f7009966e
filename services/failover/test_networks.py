"""Test failover networks: none, an existing (isolated) network, or one made for a test (and
deleted at its cleanup); each a durable step of the job."""

from __future__ import annotations

import uuid

from services.failover import item_failover_repository as failover_repo
from services.failover import read_model_repository as read_models
from services.failover.steps import TestNetwork
from services.failover.workflow import Run, StepFailed, StepResult
from shared.schemas.inventory import VmNetwork


class NetworkDeleted(StepResult):
    network_id: str
    deleted: bool


async def test_network(run: Run) -> TestNetwork:
    """The test network: none, an existing (isolated) one, or one created for this test."""
    choice = run.job.params.network or "none"
    if choice == "none":
        return TestNetwork()

    async def effect(_cid: uuid.UUID) -> TestNetwork:
        nets = await read_models.networks(run.pool, run.vault_id)
        if choice != "create":
            if choice not in nets:
                raise StepFailed(
                    f"test network {choice} is not known",
                    "not discovered",
                    "choose another network",
                )
            network = VmNetwork.model_validate(nets[choice]["network"])
            return TestNetwork(network_id=choice, network=network, created=False)
        network_id = f"test-{run.job_id.hex[:12]}"
        site = run.job.params.target_site or ""
        template = next(
            (
                VmNetwork.model_validate(n["network"])
                for n in nets.values()
                if n["site"] == site and not n["network"].get("isolated")
            ),
            None,
        )
        network = VmNetwork(
            network_id=network_id,
            name=f"test-failover-{run.job_id.hex[:8]}",
            subnets=template.subnets if template else [],
            isolated=True,
        )
        await failover_repo.insert_test_network(
            run.pool, run.vault_id, run.job_id, network_id, site, network.name
        )
        return TestNetwork(network_id=network_id, network=network, created=True)

    return await run.step(
        "network", f"test network: {choice}", TestNetwork, effect, crash="network"
    )


async def delete_test_networks(run: Run, test_job_ids: set[str]) -> None:
    for network_id in await failover_repo.open_test_networks(
        run.pool, [uuid.UUID(j) for j in test_job_ids]
    ):

        async def effect(_cid: uuid.UUID, network_id: str = network_id) -> NetworkDeleted:
            await failover_repo.delete_test_network(run.pool, network_id)
            return NetworkDeleted(network_id=network_id, deleted=True)

        await run.step(
            f"delete_network:{network_id}",
            f"delete test network {network_id}",
            NetworkDeleted,
            effect,
            crash="delete_network",
        )

"""Services survive a PostgreSQL or Kafka restart and go on: heartbeats keep being applied
and the disconnect sweeper keeps working afterwards."""

from __future__ import annotations

import httpx
import pytest

from kit import procs
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack, fresh_database, random_prefix, stack_command

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
@pytest.mark.parametrize("component", ["pg", "kafka"])
async def test_registration_goes_on_after_a_restart(
    stack: Stack, tmp_path: object, component: str
) -> None:
    plat = Platform(
        stack=stack,
        database_url=await fresh_database(stack, "restart"),
        prefix=random_prefix("restart"),
        log_dir=tmp_path,  # type: ignore[arg-type]
    )
    # after the restart the agent stops at once: with no heartbeat fetched since, silence
    # counts from the outage's end after the hold (60 s by default)
    env = {**plat.env, "DR_REGISTRATION_OUTAGE_HOLD_SECONDS": "5"}
    plat.services["registration"] = procs.service("registration", env, plat.log_dir).start()
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            vault = await plat.new_vault(http)
            key = (await plat.new_key(http, vault["vault_id"]))["key"]
            env = {
                "DR_AGENT_REGISTRATION_KEY": key,
                "DR_AGENT_REGISTRATION_URL": plat.url("registration"),
                "DR_AGENT_NAME": "hv-restart",
                "DR_AGENT_HEARTBEAT_SECONDS": "0.5",
            }
            agent = plat.edge("services.host_agent", "DR_AGENT_", "agent", env).start()
            url = f"{plat.url('registration')}/v1/vaults/{vault['vault_id']}/producers"

            async def state() -> str:
                resp = await http.get(url, headers=plat.admin())
                return str(resp.json()[0]["connection_state"]) if resp.is_success else "?"

            async def connected() -> bool:
                return await state() == "Connected"

            async def disconnected() -> bool:
                return await state() == "Disconnected"

            await eventually(connected, timeout=20, what="agent Connected")
            await stack_command(f"{component}-restart")

            async def healthy() -> bool:
                try:
                    resp = await http.get(f"{plat.url('registration')}/healthz")
                except httpx.HTTPError:
                    return False
                return resp.status_code == 200

            await eventually(healthy, timeout=180, what="service healthy after the restart")
            agent.stop()
            await eventually(disconnected, timeout=30, what="sweeper works after the restart")
            agent.start()
            await eventually(connected, timeout=180, what="heartbeats applied after the restart")
            assert plat.services["registration"].alive(), "the service must not have died"
            assert plat.services["registration"].starts == 1
    finally:
        await plat.close()

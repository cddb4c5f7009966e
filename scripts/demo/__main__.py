"""`python -m scripts.demo`: the demo's set-up (a fresh database, topic prefix and log folder on
the running stack), its stories in order, and the summary line; exits non-zero if a check
failed."""

from __future__ import annotations

import asyncio
import sys
import time

import httpx

from kit.platform import Platform
from kit.procs import REPO
from kit.stack import fresh_database, random_prefix, stack_from_env
from scripts.demo.failover import failover_story
from scripts.demo.harness import Demo
from scripts.demo.inventory_policy import inventory_policy_story
from scripts.demo.registration import registration_story
from scripts.demo.replication import replication_story


async def run() -> int:
    stack = stack_from_env()
    problem = stack.reachable()
    if problem:
        print(f"FAIL stack: {problem}")
        return 1
    run_id = time.strftime("%Y%m%d-%H%M%S")
    run_dir = REPO / ".state" / "demo" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    platform = Platform(
        stack=stack,
        database_url=await fresh_database(stack, f"demo_{run_id.replace('-', '_')}"),
        prefix=random_prefix("demo"),
        log_dir=run_dir,
    )
    demo = Demo(platform)
    print(f"demo run {run_id}: logs in {run_dir.relative_to(REPO)}, topic prefix {demo.prefix}")
    try:
        async with httpx.AsyncClient(timeout=15) as http:
            await registration_story(demo, http)
            if all(why is None for _, why in demo.results):
                await inventory_policy_story(demo, http)
            if all(why is None for _, why in demo.results):
                await replication_story(demo, http)
            if all(why is None for _, why in demo.results):
                await failover_story(demo, http)
    finally:
        demo.stop()
    failed = [what for what, why in demo.results if why is not None]
    print(f"\n{len(demo.results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not demo.results else 0


def main() -> None:
    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()

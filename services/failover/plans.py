"""The recovery-plan workflow (groups in order, the items of a group in parallel, pre- and
post-actions: scripts run by the service, manual actions an operator approves) and the
registry of every job kind's workflow."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid

from services.failover import item_failover_repository as failover_repo
from services.failover.domain.jobs import OPERATION_KIND, Operation
from services.failover.domain.plans import PlanAction, actions_for
from services.failover.domain.scripts import environment_secrets, script_env, script_failure
from services.failover.domain.scripts import excerpt as redacted_excerpt
from services.failover.item_workflows import item_workflow, run_items
from services.failover.job import JobResult
from services.failover.scripts_folder import script_file
from services.failover.test_networks import test_network
from services.failover.workflow import Run, StepFailed, StepResult, Workflow


class ScriptRun(StepResult):
    """A script action's exit status and the end of its output (secrets removed)."""

    returncode: int | None
    output: str


async def _bounded_read(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    """Read a stream to its end, keeping only its last `limit` bytes."""
    kept = bytearray()
    while stream is not None and (chunk := await stream.read(65_536)):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
    return bytes(kept)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def run_action(run: Run, key: str, action: PlanAction) -> None:
    if action.kind == "manual":
        await run.manual(key, action)
        return
    settings = run.settings
    timeout = action.timeout_seconds or settings.script_timeout_seconds
    secrets = environment_secrets(dict(os.environ))

    def excerpt(data: bytes, limit: int) -> str:
        return redacted_excerpt(data, limit, secrets)

    async def effect(_cid: uuid.UUID) -> ScriptRun:
        assert action.script is not None
        try:
            path = script_file(settings.scripts_dir, action.script)
            proc = await asyncio.create_subprocess_exec(
                str(path),
                *action.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=path.parent,
                start_new_session=True,
                env=script_env(
                    settings.script_path,
                    {
                        "job_id": str(run.job_id),
                        "operation": run.job.operation.value,
                        "vault_id": str(run.vault_id),
                        "target": run.job.target,
                        "action_id": action.action_id,
                    },
                ),
            )
        except (OSError, ValueError) as exc:
            raise StepFailed(
                f"script {action.name} could not start: {excerpt(str(exc).encode(), 500)}",
                "the script is missing from the scripts folder or is not executable",
                "put the script in the failover service's scripts folder, then restart the job",
            ) from None
        limit = settings.script_output_bytes
        reads = asyncio.gather(_bounded_read(proc.stdout, limit), _bounded_read(proc.stderr, limit))

        async def finish() -> tuple[bytes, bytes]:
            out_err = await asyncio.shield(reads)
            await proc.wait()
            return out_err

        timed_out = False
        try:
            out, err = await asyncio.wait_for(finish(), timeout)
        except TimeoutError:
            timed_out = True
        finally:
            if proc.returncode is None:
                _kill_group(proc)
        if timed_out:
            try:  # whatever it wrote until killed (a child that left the group may hold a pipe)
                out, err = await asyncio.wait_for(asyncio.shield(reads), 5)
            except TimeoutError:
                reads.cancel()
                out, err = b"", b""
            await proc.wait()
        why = script_failure(proc.returncode, excerpt(err, 500), timed_out, timeout)
        if why:
            raise StepFailed(
                f"script {action.name} failed: {why}",
                "a script action fails on a timeout, a non-zero exit or any stderr output",
                "fix the script, then restart the job",
            )
        return ScriptRun(
            returncode=proc.returncode, output=excerpt(out, settings.script_excerpt_chars)
        )

    await run.step(key, f"script: {action.name}", ScriptRun, effect, crash="script")


def plan_workflow(operation: Operation) -> Workflow:
    async def run_plan(run: Run) -> JobResult:
        groups = run.job.params.groups or []
        kind = OPERATION_KIND.get(operation)
        goes_on = operation is Operation.UNPLANNED_FAILOVER
        test_net = await test_network(run) if operation is Operation.TEST_FAILOVER else None
        for g_no, group in enumerate(groups, 1):
            for stage, actions in (
                ("pre", group.pre_actions),
                ("items", None),
                ("post", group.post_actions),
            ):
                if actions is None:
                    ids = [await failover_repo.current_item(run.pool, i) for i in group.items]
                    await run_items(run, operation, ids, test_net)
                    continue
                for action in actions_for(actions, kind):
                    try:
                        await run_action(run, f"group{g_no}:{stage}:{action.action_id}", action)
                    except StepFailed:
                        if not goes_on:
                            raise
                        run.errors += 1
        return JobResult(groups=len(groups))

    return run_plan


def workflows() -> dict[str, Workflow]:
    """Job kind (`item:<operation>` / `plan:<operation>`) -> workflow."""
    out: dict[str, Workflow] = {}
    for op in Operation:
        out[f"item:{op.value}"] = item_workflow(op)
        out[f"plan:{op.value}"] = plan_workflow(op)
    return out

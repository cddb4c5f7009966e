"""`drctl failover|plan|job|approve ...`: failovers of protected items, recovery plans, jobs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from services.cli.client import ApiError
from services.cli.context import Context, UsageError
from services.cli.output import Column, field
from services.cli.progress import JobWatch

OPERATIONS = {
    "test": "test-failover",
    "cleanup": "test-failover-cleanup",
    "planned": "planned-failover",
    "unplanned": "unplanned-failover",
    "commit": "commit",
    "reverse": "reverse-replicate",
    "failback": "failback",
}
JOB_COLUMNS: list[Column] = [
    ("JOB_ID", field("job_id")),
    ("OPERATION", field("operation")),
    ("TARGET", field("target")),
    ("STATE", field("state")),
    ("PROGRESS", lambda r: f"{r['progress']}%"),
    ("RESTARTS", field("restarts")),
    ("CREATED", field("created_at")),
]
TASK_COLUMNS: list[Column] = [
    ("NO", field("task_no")),
    ("TASK", field("name")),
    ("STATE", field("state")),
    ("ERROR", field("error")),
]
PLAN_COLUMNS: list[Column] = [
    ("PLAN_ID", field("plan_id")),
    ("NAME", field("name")),
    ("GROUPS", lambda r: len(r["groups"])),
    ("ITEMS", field("item_count")),
]


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if getattr(args, "seq", None) is not None:
        body.update(choice="chosen", cycle_seq=args.seq)
    elif getattr(args, "app_consistent", False):
        body["choice"] = "latest_app_consistent"
    for key in ("network", "notes"):
        if getattr(args, key, None):
            body[key] = getattr(args, key)
    if getattr(args, "shutdown_source", False):
        body["shutdown_source"] = True
    if getattr(args, "force_full_resync", False):
        body["force_full_resync"] = True
    return body


def _started(ctx: Context, job: dict[str, Any], watch: bool) -> None:
    if not watch:
        ctx.record(job, ["job_id", "operation", "target", "state"])
        return
    if not ctx.json:
        ctx.record(job, ["job_id", "operation", "target", "state"])
    # Progress on stdout, or on stderr when stdout carries the JSON answer (the ended job).
    done = _watch(ctx, str(job["job_id"]), sys.stderr if ctx.json else ctx.out)
    if ctx.json:
        ctx.record(done)


def _operation(op: str, on: str) -> Callable[[Context, argparse.Namespace], None]:
    def run(ctx: Context, args: argparse.Namespace) -> None:
        target = args.item_id if on == "failovers" else args.plan
        path = ctx.vault_path(f"/{on}/{target}/{OPERATIONS[op]}")
        _started(ctx, ctx.api.call("failover", "POST", path, body=_body(args)), args.watch)

    return run


def _approve_hint(job: dict[str, Any]) -> str | None:
    if job["state"] == "waiting_for_input" and job.get("waiting_for"):
        action = job["waiting_for"]["action_id"]
        return f"waiting: approve with `drctl approve {job['job_id']} {action}`"
    return None


def _watch(ctx: Context, job_id: str, out: TextIO) -> dict[str, Any]:
    """Live progress until the job ends (long-polls the service)."""

    def fetch(state: str | None, progress: int | None) -> dict[str, Any]:
        params = {"state": state, "progress": progress, "timeout": 20}
        path = ctx.vault_path(f"/jobs/{job_id}/watch")
        return dict(ctx.api.call("failover", "GET", path, params=params))

    return JobWatch(fetch=fetch, out=out, approve_hint=_approve_hint).run()


def job_list(ctx: Context, args: argparse.Namespace) -> None:
    params = {"state": args.state, "operation": args.operation, "target": args.target}
    ctx.rows(ctx.api.call("failover", "GET", ctx.vault_path("/jobs"), params=params), JOB_COLUMNS)


def job_show(ctx: Context, args: argparse.Namespace) -> None:
    job = ctx.api.call("failover", "GET", ctx.vault_path(f"/jobs/{args.job_id}"))
    if ctx.json:
        ctx.record(job)
        return
    keys = ["job_id", "operation", "target", "state", "progress", "error", "cause"]
    ctx.record(job, [*keys, "recommendation", "restarts", "waiting_for"])
    ctx.out.write("\n")
    ctx.rows(job["tasks"], TASK_COLUMNS)
    ctx.out.write("\n")
    for entry in job["history"]:
        ctx.out.write(f"{entry['at']}  {entry['message']}\n")


def job_watch(ctx: Context, args: argparse.Namespace) -> None:
    job = _watch(ctx, args.job_id, sys.stderr if ctx.json else ctx.out)
    if ctx.json:
        ctx.record(job)


def job_restart(ctx: Context, args: argparse.Namespace) -> None:
    job = ctx.api.call("failover", "POST", ctx.vault_path(f"/jobs/{args.job_id}/restart"))
    _started(ctx, job, args.watch)


def approve(ctx: Context, args: argparse.Namespace) -> None:
    body = {"action_id": args.action_id, "comment": args.comment or ""}
    path = ctx.vault_path(f"/jobs/{args.job_id}/approve")
    ctx.record(ctx.api.call("failover", "POST", path, body=body))


READY = ("replicating", "synced")


def failover_status(ctx: Context, args: argparse.Namespace) -> None:
    if args.item_id:
        path = ctx.vault_path(f"/failovers/{args.item_id}")
        view = ctx.api.call("failover", "GET", path)
        deadline = time.monotonic() + args.wait_seconds
        while args.wait and not (view["replication_state"] in READY and view["latest_seq"]):
            if time.monotonic() > deadline:
                raise ApiError(0, f"not ready for failover after {args.wait_seconds:g} s")
            time.sleep(1)
            view = ctx.api.call("failover", "GET", path)
        ctx.record(view)
        return
    if args.wait:
        raise UsageError("--wait needs an item id")
    rows = ctx.api.call("failover", "GET", ctx.vault_path("/failovers"))
    columns: list[Column] = [
        ("ITEM_ID", field("item_id")),
        ("VM", field("vm_name")),
        ("REPLICATION", field("replication_state")),
        ("FAILOVER", field("failover_state")),
    ]
    ctx.rows(rows, columns)


def plan_create(ctx: Context, args: argparse.Namespace) -> None:
    with open(args.file) as fh:
        spec = json.load(fh)
    spec.setdefault("name", args.name)
    ctx.record(ctx.api.call("failover", "POST", ctx.vault_path("/recovery-plans"), body=spec))


def plan_list(ctx: Context, args: argparse.Namespace) -> None:
    ctx.rows(ctx.api.call("failover", "GET", ctx.vault_path("/recovery-plans")), PLAN_COLUMNS)


def plan_show(ctx: Context, args: argparse.Namespace) -> None:
    ctx.record(ctx.api.call("failover", "GET", ctx.vault_path(f"/recovery-plans/{args.plan}")))


def plan_delete(ctx: Context, args: argparse.Namespace) -> None:
    path = ctx.vault_path(f"/recovery-plans/{args.plan}")
    ctx.record(ctx.api.call("failover", "DELETE", path), ["plan_id", "name"])


def _options(p: argparse.ArgumentParser, op: str) -> None:
    if op in ("test", "unplanned"):
        p.add_argument("--seq", type=int, help="a chosen recovery point (default: latest)")
        p.add_argument("--app-consistent", action="store_true", help="latest app-consistent")
    if op == "test":
        p.add_argument("--network", help="none, an isolated network id, or create")
    if op == "cleanup":
        p.add_argument("--notes", help="test notes to record")
    if op == "unplanned":
        p.add_argument("--shutdown-source", action="store_true", help="try to sync first")
    if op == "reverse":
        p.add_argument("--force-full-resync", action="store_true")
    p.add_argument("--watch", action="store_true", help="show live progress")


def add_failover_commands(group: Any, leaf: Any, resources: Any, common: Any) -> None:
    fo = group("failover", "failovers of protected items (each runs as a job)")
    for op, help_ in (
        ("test", "test failover (a drill; replication untouched)"),
        ("cleanup", "clean up a test failover"),
        ("planned", "planned failover (zero data loss, proven)"),
        ("unplanned", "unplanned failover (disaster)"),
        ("commit", "commit a failover"),
        ("reverse", "reverse replication"),
        ("failback", "fail back to the primary, then reverse again"),
    ):
        p = leaf(fo, op, help_, _operation(op, "failovers"))
        p.add_argument("item_id")
        _options(p, op)
    p = leaf(fo, "status", "items' failover state", failover_status)
    p.add_argument("item_id", nargs="?")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait until the failover service sees the item ready for a planned failover or "
        "failback (replicating, with a recovery point)",
    )
    p.add_argument("--wait-seconds", type=float, default=600, help="give up after (default 600)")

    plan = group("plan", "recovery plans (at most 7 groups and 100 items)")
    p = leaf(plan, "create", "create a plan from a JSON file ({groups: [...]})", plan_create)
    p.add_argument("name")
    p.add_argument("--file", required=True)
    leaf(plan, "list", "list plans", plan_list)
    leaf(plan, "show", "show a plan", plan_show).add_argument("plan")
    leaf(plan, "delete", "delete a plan", plan_delete).add_argument("plan")
    for op in OPERATIONS:
        p = leaf(plan, op, f"run the plan: {OPERATIONS[op]}", _operation(op, "recovery-plans"))
        p.add_argument("plan")
        _options(p, op)

    job = group("job", "jobs: every operation's progress, tasks and errors")
    p = leaf(job, "list", "list jobs", job_list)
    p.add_argument("--state")
    p.add_argument("--operation")
    p.add_argument("--target", help="an item or plan id")
    leaf(job, "show", "a job with its tasks and history", job_show).add_argument("job_id")
    leaf(job, "watch", "live progress until the job ends", job_watch).add_argument("job_id")
    p = leaf(job, "restart", "re-run a failed job", job_restart)
    p.add_argument("job_id")
    p.add_argument("--watch", action="store_true")

    p = resources.add_parser("approve", help="approve a plan's manual action", parents=[common])
    p.add_argument("job_id")
    p.add_argument("action_id")
    p.add_argument("--comment")
    p.set_defaults(func=approve)

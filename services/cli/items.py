"""`drctl item ...`: replication of VMs (protected items), their recovery points and actions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from services.cli import output
from services.cli.context import Context
from services.cli.output import Column, field
from services.cli.progress import InitialWatch

ITEM_COLUMNS: list[Column] = [
    ("ITEM_ID", field("item_id")),
    ("VM", field("vm_name")),
    ("STATE", field("state")),
    ("HEALTH", field("health")),
    ("RPO_S", lambda r: "-" if r.get("rpo_seconds") is None else f"{r['rpo_seconds']:.1f}"),
    ("LAST_POINT", field("last_committed_seq")),
    ("TARGET", field("target_site")),
]
POINT_COLUMNS: list[Column] = [
    ("SEQ", field("cycle_seq")),
    ("KIND", field("kind")),
    ("TYPE", field("point_type")),
    ("SOURCE_TIME", field("source_time")),
    ("CHANGED_BLOCKS", field("changed_blocks")),
    ("BYTES", field("bytes")),
]


def _path(ctx: Context, suffix: str = "") -> str:
    return ctx.vault_path(f"/protected-items{suffix}")


def item_enable(ctx: Context, args: argparse.Namespace) -> None:
    items = [
        ctx.api.call("replication", "POST", _path(ctx), body={"vm_id": vm_id})
        for vm_id in args.vm_ids
    ]
    if args.watch:
        if not ctx.json:
            ctx.rows(items, ITEM_COLUMNS)
        # Progress on stdout, or on stderr when stdout carries the JSON answer.
        watch = InitialWatch(
            fetch=lambda item_id: ctx.api.call("replication", "GET", _path(ctx, f"/{item_id}")),
            out=sys.stderr if ctx.json else ctx.out,
        )
        items = watch.run([str(i["item_id"]) for i in items])
        if ctx.json:
            output.as_json(items, ctx.out)
        return
    ctx.rows(items, ITEM_COLUMNS)


def item_list(ctx: Context, args: argparse.Namespace) -> None:
    params = {"state": args.state, "health": args.health}
    ctx.rows(ctx.api.call("replication", "GET", _path(ctx), params=params), ITEM_COLUMNS)


def item_show(ctx: Context, args: argparse.Namespace) -> None:
    ctx.record(ctx.api.call("replication", "GET", _path(ctx, f"/{args.item_id}")))


def item_points(ctx: Context, args: argparse.Namespace) -> None:
    points = ctx.api.call("replication", "GET", _path(ctx, f"/{args.item_id}/recovery-points"))
    ctx.rows(points, POINT_COLUMNS)


def item_verify(ctx: Context, args: argparse.Namespace) -> None:
    seq = args.seq
    if seq is None:
        points = ctx.api.call("replication", "GET", _path(ctx, f"/{args.item_id}/recovery-points"))
        if not points:
            ctx.out.write("no recovery point yet\n")
            return
        seq = points[0]["cycle_seq"]
    result = ctx.api.call(
        "replication", "POST", _path(ctx, f"/{args.item_id}/recovery-points/{seq}/verify")
    )
    if ctx.json:
        output.as_json(result, ctx.out)
        return
    verdict = "VERIFIED" if result.get("ok") else "FAILED"
    ctx.out.write(f"recovery point {seq}: {verdict}\n")
    for disk in result.get("disks", []):
        ctx.out.write(f"  {disk}\n")


def _action(name: str) -> Callable[[Context, argparse.Namespace], None]:
    def run(ctx: Context, args: argparse.Namespace) -> None:
        item = ctx.api.call("replication", "POST", _path(ctx, f"/{args.item_id}/{name}"))
        ctx.record(item, ["item_id", "vm_name", "state", "health"])

    return run


def item_disable(ctx: Context, args: argparse.Namespace) -> None:
    params: dict[str, Any] = {}
    if args.delete_replica is not None:
        params["delete_replica"] = str(args.delete_replica).lower()
    item = ctx.api.call("replication", "DELETE", _path(ctx, f"/{args.item_id}"), params=params)
    ctx.record(item, ["item_id", "vm_name", "state"])


def add_item_commands(group: Any, leaf: Any) -> None:
    item = group("item", "replicated VMs (protected items) and their recovery points")
    p = leaf(item, "enable", "enable replication of VMs (prerequisites checked)", item_enable)
    p.add_argument("vm_ids", nargs="+", metavar="VM_ID")
    p.add_argument(
        "--watch",
        action="store_true",
        help="wait for initial replication, showing its progress (bytes, rate, ETA)",
    )
    p = leaf(item, "list", "protected items with health and RPO", item_list)
    p.add_argument("--state")
    p.add_argument("--health", choices=["Normal", "Warning", "Critical"])
    leaf(item, "show", "one item with statistics", item_show).add_argument("item_id")
    leaf(item, "points", "retained recovery points", item_points).add_argument("item_id")
    p = leaf(item, "verify", "re-verify a recovery point (default: latest)", item_verify)
    p.add_argument("item_id")
    p.add_argument("--seq", type=int)
    for name, help_ in (
        ("pause", "pause replication"),
        ("resume", "resume replication"),
        ("resync", "resynchronise (only differing blocks are sent)"),
    ):
        leaf(item, name, help_, _action(name)).add_argument("item_id")
    p = leaf(item, "disable", "disable replication", item_disable)
    p.add_argument("item_id")
    p.add_argument(
        "--delete-replica", action=argparse.BooleanOptionalAction, help="override the policy"
    )

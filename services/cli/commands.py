"""The CLI's commands: one argparse subcommand per resource and action, each a small function
that calls a service and prints the answer (a table, a record, or JSON with `--json`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from services.cli import output
from services.cli.context import Command, Context, UsageError
from services.cli.failover import add_failover_commands
from services.cli.items import add_item_commands
from services.cli.output import Column, field

# ------------------------------------------------------------------------------ registration

VAULT_COLUMNS: list[Column] = [
    ("VAULT_ID", field("vault_id")),
    ("NAME", field("name")),
    ("CREATED", field("created_at")),
]
TOKEN_COLUMNS: list[Column] = [
    ("TOKEN_ID", field("token_id")),
    ("NAME", field("name")),
    ("ROLE", field("role")),
    ("CREATED", field("created_at")),
    ("REVOKED", field("revoked_at")),
]
KEY_COLUMNS: list[Column] = [
    ("KEY_ID", field("key_id")),
    ("CREATED", field("created_at")),
    ("EXPIRES", field("expires_at")),
    ("REVOKED", field("revoked_at")),
]
SITE_COLUMNS: list[Column] = [
    ("KIND", field("kind")),
    ("SITE", field("site")),
    ("NAME", field("name")),
    ("STATE", field("connection_state")),
    ("LAST_HEARTBEAT", field("last_heartbeat_at")),
    ("PRODUCER_ID", field("producer_id")),
]


def vault_create(ctx: Context, args: argparse.Namespace) -> None:
    data = ctx.api.call("registration", "POST", "/v1/vaults", body={"name": args.name})
    ctx.record(data, note=f"export DR_VAULT={data['vault_id']}")


def vault_list(ctx: Context, args: argparse.Namespace) -> None:
    ctx.rows(ctx.api.call("registration", "GET", "/v1/vaults"), VAULT_COLUMNS)


def token_create(ctx: Context, args: argparse.Namespace) -> None:
    body = {"name": args.name, "role": args.role}
    data = ctx.api.call("registration", "POST", ctx.vault_path("/tokens"), body=body)
    ctx.record(data, note="The token is shown once: store it now.")


def token_list(ctx: Context, args: argparse.Namespace) -> None:
    ctx.rows(ctx.api.call("registration", "GET", ctx.vault_path("/tokens")), TOKEN_COLUMNS)


def token_revoke(ctx: Context, args: argparse.Namespace) -> None:
    path = ctx.vault_path(f"/tokens/{args.token_id}")
    ctx.record(ctx.api.call("registration", "DELETE", path))


def key_create(ctx: Context, args: argparse.Namespace) -> None:
    body = {} if args.valid_hours is None else {"valid_hours": args.valid_hours}
    data = ctx.api.call("registration", "POST", ctx.vault_path("/registration-keys"), body=body)
    ctx.record(data, note="The registration key is shown once: store it now.")


def key_list(ctx: Context, args: argparse.Namespace) -> None:
    path = ctx.vault_path("/registration-keys")
    ctx.rows(ctx.api.call("registration", "GET", path), KEY_COLUMNS)


def key_revoke(ctx: Context, args: argparse.Namespace) -> None:
    path = ctx.vault_path(f"/registration-keys/{args.key_id}")
    ctx.record(ctx.api.call("registration", "DELETE", path))


def site_list(ctx: Context, args: argparse.Namespace) -> None:
    params = {"kind": args.kind, "state": args.state, "site": args.site}
    data = ctx.api.call("registration", "GET", ctx.vault_path("/producers"), params=params)
    ctx.rows(data, SITE_COLUMNS)


def site_revoke(ctx: Context, args: argparse.Namespace) -> None:
    """Revoke a provider or agent: Kafka refuses it from now on, its signatures verify
    nothing, its credential re-registers nothing."""
    path = ctx.vault_path(f"/producers/{args.producer_id}/revoke")
    data = ctx.api.call("registration", "POST", path, body={"reason": args.reason})
    ctx.record(
        data,
        note=f"Revoked: {data.get('acls_deleted', 0)} Kafka ACLs deleted. Revoke the"
        " registration key it was registered with too if the host may have it.",
    )


# ------------------------------------------------------------------------------ inventory

INVENTORY_COLUMNS: dict[str, list[Column]] = {
    "clouds": [
        ("CLOUD_ID", field("cloud_id")),
        ("NAME", field("name")),
        ("SITE", field("site")),
        ("HOST_GROUPS", field("host_groups")),
        ("CAPACITY_VMS", field("capacity_vms")),
    ],
    "hosts": [
        ("HOST_ID", field("host_id")),
        ("NAME", field("name")),
        ("SITE", field("site")),
        ("CLOUD_ID", field("cloud_id")),
        ("HOST_GROUP", field("host_group")),
        ("OS_VERSION", field("os_version")),
    ],
    "vms": [
        ("VM_ID", field("vm_id")),
        ("NAME", field("name")),
        ("SITE", field("site")),
        ("CLOUD_ID", field("cloud_id")),
        ("HOST_ID", field("host_id")),
        ("STATE", field("state")),
        ("DISKS", lambda r: len(r.get("disks") or [])),
        ("NICS", lambda r: len(r.get("nics") or [])),
    ],
    "networks": [
        ("NETWORK_ID", field("network_id")),
        ("NAME", field("name")),
        ("SITE", field("site")),
        ("SUBNETS", lambda r: [s.get("name") for s in r.get("subnets") or []]),
        ("ISOLATED", field("isolated")),
    ],
}


def inventory_list(ctx: Context, args: argparse.Namespace) -> None:
    """The inventory service's lists; filters by site, cloud and host (id or name), VMs paged."""
    params = {
        "site": args.site,
        "cloud": getattr(args, "cloud", None),
        "host": getattr(args, "host", None),
        "name": getattr(args, "name", None),
        "limit": getattr(args, "limit", None),
        "offset": getattr(args, "offset", None),
    }
    path = ctx.vault_path(f"/{args.kind}")
    data = ctx.api.call("inventory", "GET", path, params=params)
    if args.kind != "vms" or ctx.json:
        ctx.rows(data, INVENTORY_COLUMNS[args.kind])
        return
    output.table(data["items"], INVENTORY_COLUMNS["vms"], ctx.out)
    shown = len(data["items"])
    if shown < data["total"]:
        ctx.out.write(
            f"\n{shown} of {data['total']} VMs from offset {data['offset']}: "
            "page on with --offset\n"
        )


# ------------------------------------------------------------------------------ policies

POLICY_COLUMNS: list[Column] = [
    ("NAME", field("name")),
    ("POLICY_ID", field("policy_id")),
    ("COPY_S", lambda r: r["settings"]["copy_frequency_seconds"]),
    ("POINTS", lambda r: r["settings"]["recovery_points"]),
    ("APP_H", lambda r: r["settings"]["app_consistent_frequency_hours"]),
    ("AUTH", lambda r: f"{r['settings']['authentication']}:{r['settings']['port']}"),
    ("INITIAL", lambda r: r["settings"]["initial_replication"]),
    ("VERSION", field("version")),
]
SETTING_FLAGS = {
    "copy_frequency": "copy_frequency_seconds",
    "recovery_points": "recovery_points",
    "app_consistent_hours": "app_consistent_frequency_hours",
    "compression": "compression",
    "auth": "authentication",
    "port": "port",
    "initial_replication": "initial_replication",
    "start_at": "initial_replication_start_at",
    "export_path": "offline_export_path",
    "import_path": "offline_import_path",
    "delete_replica_on_disable": "delete_replica_on_disable",
    "target_os": "target_host_os_version",
}


def _settings_from(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: getattr(args, flag)
        for flag, key in SETTING_FLAGS.items()
        if getattr(args, flag, None) is not None
    }


def policy_create(ctx: Context, args: argparse.Namespace) -> None:
    body = {"name": args.name, "settings": _settings_from(args)}
    ctx.record(ctx.api.call("policy", "POST", ctx.vault_path("/policies"), body=body))


def policy_list(ctx: Context, args: argparse.Namespace) -> None:
    ctx.rows(ctx.api.call("policy", "GET", ctx.vault_path("/policies")), POLICY_COLUMNS)


def policy_show(ctx: Context, args: argparse.Namespace) -> None:
    ctx.record(ctx.api.call("policy", "GET", ctx.vault_path(f"/policies/{args.policy}")))


def policy_update(ctx: Context, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"settings": _settings_from(args)}
    if args.new_name:
        body["name"] = args.new_name
    if not body["settings"] and "name" not in body:
        raise UsageError("nothing to update: give at least one setting option or --name")
    path = ctx.vault_path(f"/policies/{args.policy}")
    ctx.record(ctx.api.call("policy", "PATCH", path, body=body))


def policy_delete(ctx: Context, args: argparse.Namespace) -> None:
    ctx.record(ctx.api.call("policy", "DELETE", ctx.vault_path(f"/policies/{args.policy}")))


# ------------------------------------------------------------------------------ pairings

PAIRING_COLUMNS: list[Column] = [
    ("PAIRING_ID", field("pairing_id")),
    ("SOURCE", lambda r: f"{r['source_site']}/{r['source_cloud_name'] or r['source_cloud_id']}"),
    ("TARGET", lambda r: f"{r['target_site']}/{r['target_cloud_name'] or r['target_cloud_id']}"),
    ("POLICY", field("policy_name")),
    ("CREATED", field("created_at")),
]


def pairing_create(ctx: Context, args: argparse.Namespace) -> None:
    body = {
        "source_cloud_id": args.source,
        "target_cloud_id": args.target,
        "policy": args.policy,
    }
    ctx.record(ctx.api.call("policy", "POST", ctx.vault_path("/pairings"), body=body))


def pairing_list(ctx: Context, args: argparse.Namespace) -> None:
    ctx.rows(ctx.api.call("policy", "GET", ctx.vault_path("/pairings")), PAIRING_COLUMNS)


def pairing_delete(ctx: Context, args: argparse.Namespace) -> None:
    ctx.record(ctx.api.call("policy", "DELETE", ctx.vault_path(f"/pairings/{args.pairing_id}")))


# ------------------------------------------------------------------------------ mappings

MAPPING_COLUMNS: list[Column] = [
    ("MAPPING_ID", field("mapping_id")),
    (
        "SOURCE",
        lambda r: f"{r['source_site']}/{r['source_network_name'] or r['source_network_id']}",
    ),
    (
        "TARGET",
        lambda r: f"{r['target_site']}/{r['target_network_name'] or r['target_network_id']}",
    ),
    ("UPDATED", field("updated_at")),
]


def mapping_create(ctx: Context, args: argparse.Namespace) -> None:
    body = {"source_network_id": args.source, "target_network_id": args.target}
    ctx.record(ctx.api.call("policy", "POST", ctx.vault_path("/network-mappings"), body=body))


def mapping_list(ctx: Context, args: argparse.Namespace) -> None:
    ctx.rows(ctx.api.call("policy", "GET", ctx.vault_path("/network-mappings")), MAPPING_COLUMNS)


def mapping_update(ctx: Context, args: argparse.Namespace) -> None:
    path = ctx.vault_path(f"/network-mappings/{args.mapping_id}")
    body = {"target_network_id": args.target}
    ctx.record(ctx.api.call("policy", "PATCH", path, body=body))


def mapping_delete(ctx: Context, args: argparse.Namespace) -> None:
    path = ctx.vault_path(f"/network-mappings/{args.mapping_id}")
    ctx.record(ctx.api.call("policy", "DELETE", path))


# ------------------------------------------------------------------------------ prerequisites

CHECK_COLUMNS: list[Column] = [
    ("RULE", field("rule")),
    ("STATUS", field("status")),
    ("MESSAGE", field("message")),
]


def prereq(ctx: Context, args: argparse.Namespace) -> None:
    if len(args.vm_ids) == 1:
        params = {"vm_id": args.vm_ids[0]}
        one = ctx.api.call("policy", "GET", ctx.vault_path("/prerequisites"), params=params)
        data: dict[str, Any] = {"ok": one["ok"], "results": [one]}
    else:
        body = {"vm_ids": args.vm_ids}
        data = ctx.api.call("policy", "POST", ctx.vault_path("/prerequisites"), body=body)
    if ctx.json:
        output.as_json(data["results"][0] if len(args.vm_ids) == 1 else data, ctx.out)
        return
    for i, result in enumerate(data["results"]):
        if i:
            ctx.out.write("\n")
        verdict = "ready to protect" if result["ok"] else "NOT ready to protect"
        ctx.out.write(f"VM {result['vm_id']}: {verdict}\n")
        output.table(result["checks"], CHECK_COLUMNS, ctx.out)


# ------------------------------------------------------------------------------ the parser


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted before and after the subcommand (after wins)."""
    default: Any = argparse.SUPPRESS if suppress else None
    env = os.environ
    parser.add_argument(
        "--url",
        default=default,  # not DR_URL here: per-service variables take precedence over it
        help="base URL of the whole platform, overriding the environment; without it: "
        "DR_REGISTRATION_URL, DR_INVENTORY_URL, DR_POLICY_URL per service, else DR_URL",
    )
    parser.add_argument(
        "--token",
        default=default if suppress else env.get("DR_TOKEN"),
        help="API token (env DR_TOKEN)",
    )
    parser.add_argument(
        "--vault",
        default=default if suppress else env.get("DR_VAULT"),
        help="vault id (env DR_VAULT)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print machine-readable JSON",
    )


def _policy_settings_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("replication settings")
    g.add_argument(
        "--copy-frequency",
        type=int,
        metavar="SECONDS",
        help="seconds between copies: 30, 300 (default) or 900, or any of 1..3600",
    )
    g.add_argument(
        "--recovery-points", type=int, metavar="N", help="additional hourly points, 0..168"
    )
    g.add_argument(
        "--app-consistent-hours",
        type=int,
        metavar="H",
        help="app-consistent snapshot every H hours (0 off, 1..12; < recovery points)",
    )
    g.add_argument(
        "--compression", action=argparse.BooleanOptionalAction, help="compress transfers"
    )
    g.add_argument("--auth", choices=["certificate", "kerberos"], help="authentication")
    g.add_argument("--port", type=int, help="replication port (default 8084 cert, 8083 kerberos)")
    g.add_argument(
        "--initial-replication",
        choices=["online_now", "online_scheduled", "offline"],
        help="how the initial copy is made",
    )
    g.add_argument("--start-at", metavar="ISO8601", help="start of a scheduled initial copy")
    g.add_argument("--export-path", help="offline: export folder at the source")
    g.add_argument("--import-path", help="offline: import folder at the target")
    g.add_argument(
        "--delete-replica-on-disable",
        action=argparse.BooleanOptionalAction,
        help="delete the replica VM when protection is disabled",
    )
    g.add_argument("--target-os", metavar="VERSION", help="target host OS version")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drctl",
        description="Operate the disaster-recovery platform: vaults, tokens, registration keys, "
        "sites, inventory, replication policies, cloud pairings, network mappings.",
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    resources = parser.add_subparsers(dest="resource", metavar="RESOURCE", required=True)

    def group(name: str, help_: str) -> Any:
        sub = resources.add_parser(name, help=help_)
        return sub.add_subparsers(dest="action", metavar="ACTION", required=True)

    def leaf(actions: Any, name: str, help_: str, func: Command) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_, parents=[common])
        p.set_defaults(func=func)
        return p

    vault = group("vault", "vaults (tenant boundaries)")
    leaf(vault, "create", "create a vault (bootstrap admin token)", vault_create).add_argument(
        "name"
    )
    leaf(vault, "list", "list vaults", vault_list)

    token = group("token", "API tokens of the vault")
    p = leaf(token, "create", "issue a token (shown once)", token_create)
    p.add_argument("name")
    p.add_argument("--role", choices=["reader", "operator", "admin"], required=True)
    leaf(token, "list", "list tokens", token_list)
    leaf(token, "revoke", "revoke a token", token_revoke).add_argument("token_id")

    key = group("key", "registration keys of the vault")
    p = leaf(key, "create", "generate a registration key (shown once)", key_create)
    p.add_argument("--valid-hours", type=float, help="validity (default 120 h)")
    leaf(key, "list", "list registration keys", key_list)
    leaf(key, "revoke", "revoke a registration key", key_revoke).add_argument("key_id")

    site = group("site", "site providers and host agents")
    p = leaf(site, "list", "providers and agents with their connection state", site_list)
    p.add_argument("--kind", choices=["provider", "agent"])
    p.add_argument("--state", choices=["Connected", "Disconnected"])
    p.add_argument("--site")
    p = leaf(site, "revoke", "revoke a provider or agent (e.g. a stolen host)", site_revoke)
    p.add_argument("producer_id")
    p.add_argument("--reason", required=True, help="why (kept in the audit event)")

    inventory = group("inventory", "discovered clouds, hosts, VMs and networks")
    for kind, help_ in (
        ("clouds", "VMM clouds"),
        ("hosts", "Hyper-V hosts"),
        ("vms", "virtual machines"),
        ("networks", "VM networks"),
    ):
        p = leaf(inventory, kind, help_, inventory_list)
        p.set_defaults(kind=kind)
        p.add_argument("--site", help="only this site")
        if kind in ("hosts", "vms"):
            p.add_argument("--cloud", metavar="CLOUD", help="only this cloud (id or name)")
        if kind == "vms":
            p.add_argument("--host", metavar="HOST", help="only this host (id or name)")
            p.add_argument("--name", help="name contains (any case)")
            p.add_argument("--limit", type=int, help="page size (default 100, at most 500)")
            p.add_argument("--offset", type=int, help="page start")

    policy = group("policy", "replication policies")
    p = leaf(policy, "create", "create a policy", policy_create)
    p.add_argument("name")
    _policy_settings_options(p)
    leaf(policy, "list", "list policies", policy_list)
    leaf(policy, "show", "show a policy (id or name)", policy_show).add_argument("policy")
    p = leaf(policy, "update", "change a policy's settings", policy_update)
    p.add_argument("policy", help="id or name")
    p.add_argument("--name", dest="new_name", help="rename the policy")
    _policy_settings_options(p)
    leaf(policy, "delete", "delete a policy", policy_delete).add_argument("policy")

    pairing = group("pairing", "cloud pairings (source cloud -> target cloud + policy)")
    p = leaf(pairing, "create", "pair two clouds", pairing_create)
    p.add_argument("--source", required=True, metavar="CLOUD_ID")
    p.add_argument("--target", required=True, metavar="CLOUD_ID")
    p.add_argument("--policy", required=True, help="policy id or name")
    leaf(pairing, "list", "list pairings", pairing_list)
    leaf(pairing, "delete", "remove a pairing", pairing_delete).add_argument("pairing_id")

    mapping = group("mapping", "network mappings (source VM network -> target VM network)")
    p = leaf(mapping, "create", "map a network", mapping_create)
    p.add_argument("--source", required=True, metavar="NETWORK_ID")
    p.add_argument("--target", required=True, metavar="NETWORK_ID")
    leaf(mapping, "list", "list mappings", mapping_list)
    p = leaf(mapping, "update", "point a mapping at another target network", mapping_update)
    p.add_argument("mapping_id")
    p.add_argument("--target", required=True, metavar="NETWORK_ID")
    leaf(mapping, "delete", "remove a mapping", mapping_delete).add_argument("mapping_id")

    add_item_commands(group, leaf)
    add_failover_commands(group, leaf, resources, common)

    p = resources.add_parser(
        "prereq", help="enable-replication prerequisite checks of VMs", parents=[common]
    )
    p.add_argument("vm_ids", nargs="+", metavar="VM_ID")
    p.set_defaults(func=prereq)
    return parser

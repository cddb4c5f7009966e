"""Writes the Grafana dashboards deploy/grafana/dashboards/{fleet,item}.json from the panel
tables below (a unit test fails when the files are out of date, and checks that every metric a
panel queries is exported by the services). `python -m scripts.dashboards`

fleet: items by health, RPO distribution, throughput, cycles, resyncs, DLQ, consumer lag,
producers, failover jobs, HTTP. item: one protected item (variable `item`): RPO over time
against its threshold, recovery points, agent journal and last cycle, cycle latency quantiles.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.procs import REPO

FOLDER = REPO / "deploy" / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def _panel(pid: int, p: Panel, x: int, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "options": p.options,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                **({"format": "table", "instant": True} if p.kind == "table" else {}),
            }
            for i, (expr, legend) in enumerate(p.targets)
        ],
    }


def dashboard(
    uid: str, title: str, description: str, panels: list[Panel], variables: list[dict[str, Any]]
) -> dict[str, Any]:
    out, x, y, row_h = [], 0, 0, 0
    for pid, p in enumerate(panels, start=1):
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        out.append(_panel(pid, p, x, y))
        x += p.width
        row_h = max(row_h, p.height)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["open-site-recovery"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "links": [
            {"title": "Fleet", "type": "link", "url": "/d/dr-fleet"},
            {"title": "Item", "type": "link", "url": "/d/dr-item"},
        ],
        "panels": out,
    }


RATE = "$__rate_interval"

FLEET = [
    Panel(
        "Protected items by health",
        [("sum by (health) (dr_replication_items)", "{{health}}")],
        kind="stat",
        width=8,
        description="Normal / Warning / Critical (docs/reference.md rules), from the replication "
        "service's health evaluation.",
    ),
    Panel(
        "Site providers and host agents",
        [("sum by (kind, state) (dr_registration_producers)", "{{kind}} {{state}}")],
        kind="stat",
        width=8,
    ),
    Panel(
        "Services up",
        [("up", "{{job}} {{instance}}")],
        kind="stat",
        width=8,
    ),
    Panel(
        "RPO distribution (across items)",
        [
            ("quantile(0.5, dr_replication_rpo_seconds)", "p50"),
            ("quantile(0.95, dr_replication_rpo_seconds)", "p95"),
            ("max(dr_replication_rpo_seconds)", "max"),
        ],
        unit="s",
    ),
    Panel(
        "Worst RPO (top 10 items)",
        [("topk(10, dr_replication_rpo_seconds)", "{{vm}} {{item_id}}")],
        kind="table",
        unit="s",
    ),
    Panel(
        "Throughput: bytes applied to the replica store / shipped by agents",
        [
            (f"sum(rate(dr_replication_bytes_applied_total[{RATE}]))", "applied"),
            (f"sum by (kind) (rate(dr_agent_bytes_shipped_total[{RATE}]))", "shipped {{kind}}"),
        ],
        unit="Bps",
    ),
    Panel(
        "Delta cycles by result",
        [(f"sum by (result) (rate(dr_replication_cycles_total[{RATE}]))", "{{result}}")],
        unit="ops",
    ),
    Panel(
        "Resyncs requested (per hour)",
        [("sum by (reason) (increase(dr_replication_resyncs_total[1h]))", "{{reason}}")],
    ),
    Panel(
        "Dead-lettered events",
        [(f"sum by (topic, reason) (rate(dr_dlq_messages_total[{RATE}]))", "{{topic}} {{reason}}")],
        unit="ops",
    ),
    Panel(
        "Consumer lag",
        [("sum by (group, topic) (dr_consumer_lag)", "{{group}} {{topic}}")],
    ),
    Panel(
        "Replica store size",
        [("sum(dr_replica_store_bytes)", "bytes")],
        unit="bytes",
    ),
    Panel(
        "Failover jobs (per hour, by state)",
        [("sum by (type, state) (increase(dr_failover_jobs_total[1h]))", "{{type}} {{state}}")],
        description="Pending the failover service (dr_failover_jobs_total).",
    ),
    Panel(
        "HTTP requests by status",
        [(f"sum by (job, status) (rate(dr_http_requests_total[{RATE}]))", "{{job}} {{status}}")],
        unit="reqps",
    ),
    Panel(
        "HTTP latency p95",
        [
            (
                "histogram_quantile(0.95, sum by (job, le) "
                f"(rate(dr_http_request_seconds_bucket[{RATE}])))",
                "{{job}}",
            )
        ],
        unit="s",
    ),
]

ITEM_SELECTOR = 'item_id="$item"'

ITEM = [
    Panel(
        "RPO over time, against the policy threshold",
        [
            (f"dr_replication_rpo_seconds{{{ITEM_SELECTOR}}}", "RPO {{vm}}"),
            (f"dr_replication_rpo_threshold_seconds{{{ITEM_SELECTOR}}}", "threshold"),
        ],
        unit="s",
        width=24,
        description="RPO against its alert threshold: twice the policy's copy interval, "
        "at least 30 s.",
    ),
    Panel(
        "Recovery points committed (RPO resets per 15 min)",
        [(f"resets(dr_replication_rpo_seconds{{{ITEM_SELECTOR}}}[15m])", "{{vm}}")],
        description="Each committed recovery point brings the RPO down; `drctl item points` "
        "lists them.",
    ),
    Panel(
        "Recovery points committed (fleet, per minute)",
        [
            (
                f'sum(rate(dr_replication_cycles_total{{result="committed"}}[{RATE}])) * 60',
                "committed",
            )
        ],
    ),
    Panel(
        "Agent: seconds since the last shipped cycle",
        [(f"time() - dr_agent_last_cycle_timestamp_seconds{{{ITEM_SELECTOR}}}", "{{instance}}")],
        unit="s",
    ),
    Panel(
        "Agent: unshipped change-journal records",
        [(f"dr_agent_journal_records{{{ITEM_SELECTOR}}}", "{{instance}}")],
    ),
    Panel(
        "Cycle latency, capture to committed point (quantiles)",
        [
            (
                f"histogram_quantile({q}, sum by (le) "
                f"(rate(dr_replication_apply_latency_seconds_bucket[{RATE}])))",
                f"p{round(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
        unit="s",
    ),
    Panel(
        "Agent cycle duration, capture to last message (quantiles)",
        [
            (
                f"histogram_quantile({q}, sum by (kind, le) "
                f"(rate(dr_agent_cycle_seconds_bucket[{RATE}])))",
                f"p{round(q * 100)} {{{{kind}}}}",
            )
            for q in (0.5, 0.95)
        ],
        unit="s",
    ),
]

ITEM_VARIABLES = [
    {
        "name": "item",
        "label": "Protected item",
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": "label_values(dr_replication_rpo_seconds, item_id)", "refId": "items"},
        "definition": "label_values(dr_replication_rpo_seconds, item_id)",
        "refresh": 2,
        "sort": 1,
        "includeAll": False,
        "multi": False,
    }
]


def files() -> dict[Path, str]:
    boards = {
        "fleet.json": dashboard(
            "dr-fleet",
            "DR fleet",
            "Every protected item, site and pipeline of the platform at a glance.",
            FLEET,
            [],
        ),
        "item.json": dashboard(
            "dr-item",
            "DR protected item",
            "One protected item: RPO, recovery points, agent side, cycle latency.",
            ITEM,
            ITEM_VARIABLES,
        ),
    }
    return {FOLDER / name: json.dumps(b, indent=2) + "\n" for name, b in boards.items()}


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard (panel targets and query variables)."""
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            out.append(query)
    return out


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for path, text in files().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()

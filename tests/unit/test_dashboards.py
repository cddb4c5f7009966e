"""Every metric a Grafana panel or an alert rule queries is one the services really export
(read from `prometheus_client.REGISTRY` after importing every module of services/ and shared/),
with the label names the query filters on; the dashboards are up to date with their generator.
Names the failover service (and the replication service) will export are listed as pending:
remove them from PENDING once they are exported."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import services
import shared
from scripts import dashboards, prometheus_config

PENDING: dict[str, set[str]] = {}
# Series Prometheus itself adds to every scrape target.
BUILTIN = {"up": {"job", "instance"}, "scrape_duration_seconds": {"job", "instance"}}
TARGET_LABELS = {"job", "instance", "site"}

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan", "Inf", "NaN",
}  # fmt: skip


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, of every metric registered by the platform's modules."""
    for package in (services, shared):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)
    names: dict[str, set[str]] = {}
    for name, collector in REGISTRY._names_to_collectors.items():
        names[name] = set(getattr(collector, "_labelnames", ()))
        if name.endswith("_bucket"):
            names[name].add("le")
    return names


def metric_names(expr: str) -> dict[str, set[str]]:
    """Metric names referenced by a PromQL expression -> label names in their matchers."""
    found: dict[str, set[str]] = {}
    # Grafana's label_values(metric, label) variable query: the metric must carry the label
    text = re.sub(r"label_values\((\w+),\s*(\w+)\)", r'\1{\2=~".+"}', expr)
    text = re.sub(r"\$\{?\w+\}?", "x", text)  # Grafana variables inside strings or ranges
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", text):
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
        found.setdefault(m.group(1), set()).update(labels)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\boffset\s+\w+", "", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b", "", text)
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        if word in KEYWORDS or text[m.end() :].lstrip().startswith("("):
            continue
        found.setdefault(word, set())
    return found


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(prometheus_config.ALERTS.read_text())
    return [
        (r.get("alert") or r.get("record"), r["expr"]) for g in rules["groups"] for r in g["rules"]
    ]


def dashboard_expressions() -> list[tuple[str, str]]:
    out = []
    for path in sorted(dashboards.FOLDER.glob("*.json")):
        board = json.loads(path.read_text())
        out += [(path.name, expr) for expr in dashboards.expressions(board)]
    return out


def check(where: str, expr: str, known: dict[str, set[str]]) -> list[str]:
    problems = []
    refs = metric_names(expr)
    if not refs:
        problems.append(f"{where}: no metric found in {expr!r}")
    for name, labels in refs.items():
        if name not in known:
            problems.append(f"{where}: {name} is not exported by any service ({expr!r})")
            continue
        unknown = labels - known[name] - TARGET_LABELS
        if unknown:
            problems.append(f"{where}: {name} has no label(s) {sorted(unknown)} ({expr!r})")
    return problems


@pytest.fixture(scope="module")
def known() -> dict[str, set[str]]:
    names = exported()
    for pending in PENDING:
        assert pending not in names, (
            f"{pending} is exported now: remove it from PENDING in {__file__}"
        )
    return {**names, **BUILTIN, **PENDING}


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (job, le) (rate(dr_x_bucket{a="1",b=~"$v"}[5m])))'
        " / on (item_id) group_left () max by (item_id) (dr_y) > 3600 and time() - dr_z offset 1h"
    )
    assert metric_names(expr) == {"dr_x_bucket": {"a", "b"}, "dr_y": set(), "dr_z": set()}
    assert metric_names("label_values(dr_w, item_id)") == {"dr_w": {"item_id"}}


def test_the_platform_exports_what_the_rules_need(known: dict[str, set[str]]) -> None:
    for name in (
        "dr_replication_rpo_seconds",
        "dr_replication_items",
        "dr_replication_resyncs_total",
        "dr_registration_producers",
        "dr_dlq_messages_total",
        "dr_consumer_lag",
        "dr_http_requests_total",
    ):
        assert name in known, name


def test_every_dashboard_query_uses_exported_metrics(known: dict[str, set[str]]) -> None:
    exprs = dashboard_expressions()
    assert len(exprs) > 20
    problems = [p for where, expr in exprs for p in check(where, expr, known)]
    assert problems == [], "\n".join(problems)


def test_every_alert_rule_uses_exported_metrics(known: dict[str, set[str]]) -> None:
    problems = [p for where, expr in alert_expressions() for p in check(where, expr, known)]
    assert problems == [], "\n".join(problems)


def test_dashboards_are_up_to_date() -> None:
    for path, text in dashboards.files().items():
        assert path.read_text() == text, (
            f"{path.name} is stale: run `.venv/bin/python -m scripts.dashboards`"
        )


def test_dashboards_are_well_formed() -> None:
    for path in dashboards.FOLDER.glob("*.json"):
        board: dict[str, Any] = json.loads(path.read_text())
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "prometheus"
            assert panel["targets"], panel["title"]

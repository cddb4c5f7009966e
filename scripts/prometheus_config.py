"""Prometheus scrape configurations for every service and edge process, from one table.

Writes two files (a unit test fails when they are out of date):
  deploy/prometheus/prometheus.yml        docker compose: targets by service DNS name
  deploy/prometheus/prometheus.local.yml  the local stack: 127.0.0.1 and the default ports
Tests render their own with `render(targets, ...)` for the random ports of their processes.

The platform services' /metrics ask for the metrics token (`DR_METRICS_TOKEN`) in docker
compose: their jobs send it from `credentials_file: metrics.token` (relative to the config
file; the compose Prometheus writes it there from DR_METRICS_TOKEN at each start). Edges are
scraped without it (they never get the platform's token).

`python -m scripts.prometheus_config`
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kit.procs import REPO

FOLDER = REPO / "deploy" / "prometheus"
ALERTS = FOLDER / "alerts.yml"
COMPOSE_FILE = FOLDER / "prometheus.yml"
LOCAL_FILE = FOLDER / "prometheus.local.yml"

# job -> [(target, extra labels)]; failover (port 8105) is scraped before it exists: its
# target is simply down (`up == 0`) until the service is written and started.
Targets = Mapping[str, Sequence[tuple[str, Mapping[str, str]]]]

# jobs whose targets are platform services (given DR_METRICS_TOKEN in docker compose)
PLATFORM_JOBS = ("registration", "inventory", "policy", "replication", "failover")
TOKEN_FILE = "metrics.token"  # beside the config file

COMPOSE_TARGETS: Targets = {
    "registration": [("registration:8101", {})],
    "inventory": [("inventory:8102", {})],
    "policy": [("policy:8103", {})],
    "replication": [("replication:8104", {})],
    "failover": [("failover:8105", {})],
    "site_provider": [
        ("site-provider-primary:8110", {"site": "primary"}),
        ("site-provider-recovery:8110", {"site": "recovery"}),
    ],
    "host_agent": [
        ("host-agent-primary:8111", {"site": "primary"}),
        ("host-agent-recovery:8111", {"site": "recovery"}),
    ],
}

# Locally the edge processes listen on DR_PROVIDER_HTTP_PORT / DR_AGENT_HTTP_PORT (default 0:
# any free port); start them with these ports to have them scraped.
LOCAL_TARGETS: Targets = {
    "registration": [("127.0.0.1:8101", {})],
    "inventory": [("127.0.0.1:8102", {})],
    "policy": [("127.0.0.1:8103", {})],
    "replication": [("127.0.0.1:8104", {})],
    "failover": [("127.0.0.1:8105", {})],
    "site_provider": [
        ("127.0.0.1:8110", {"site": "primary"}),
        ("127.0.0.1:8120", {"site": "recovery"}),
    ],
    "host_agent": [
        ("127.0.0.1:8111", {"site": "primary"}),
        ("127.0.0.1:8121", {"site": "recovery"}),
    ],
}


def render(
    targets: Targets,
    *,
    scrape_interval: str = "15s",
    evaluation_interval: str = "15s",
    rule_files: Sequence[str] = ("alerts.yml",),
    alertmanagers: Sequence[str] = (),
    header: str = "",
    credentials_file: str | None = None,
    authorized_jobs: Collection[str] = (),
) -> str:
    """The scrape config of `targets`; the jobs in `authorized_jobs` send the bearer token
    read from `credentials_file` (`Authorization: Bearer`, for DR_METRICS_TOKEN)."""
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": _timeout(scrape_interval),
            "evaluation_interval": evaluation_interval,
            "external_labels": {"platform": "open-site-recovery"},
        },
        "rule_files": list(rule_files),
    }
    if alertmanagers:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": alertmanagers}]}]}
    jobs = []
    for job, entries in targets.items():
        static = []
        for target, labels in entries:
            one: dict[str, Any] = {"targets": [target]}
            if labels:
                one["labels"] = dict(labels)
            static.append(one)
        scrape: dict[str, Any] = {"job_name": job, "metrics_path": "/metrics"}
        if credentials_file and job in authorized_jobs:
            scrape["authorization"] = {"type": "Bearer", "credentials_file": credentials_file}
        jobs.append({**scrape, "static_configs": static})
    config["scrape_configs"] = jobs
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return header + body


def _timeout(interval: str) -> str:
    """Scrape timeout: the interval (Prometheus refuses a timeout longer than it), at most 10 s."""
    seconds = _seconds(interval)
    return interval if seconds <= 10 else "10s"


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    raise ValueError(f"unsupported duration {duration!r}")


def _header(what: str) -> str:
    return (
        f"# {what}\n"
        "# Generated by `python -m scripts.prometheus_config` from its target tables; edit those.\n"
        "# Jobs: the five services (failover:8105 is down until that service exists) and the\n"
        "# edge processes; alert rules in alerts.yml (unit tests: alerts_test.yml, promtool).\n"
    )


def files() -> dict[Path, str]:
    return {
        COMPOSE_FILE: render(
            COMPOSE_TARGETS,
            header=_header(
                "Prometheus scrape config for docker compose (service DNS names); the services'\n"
                f"# jobs send the metrics token from {TOKEN_FILE} (docker-compose.yml writes it)."
            ),
            credentials_file=TOKEN_FILE,
            authorized_jobs=PLATFORM_JOBS,
        ),
        LOCAL_FILE: render(
            LOCAL_TARGETS,
            header=_header(
                "Prometheus scrape config for the local stack (127.0.0.1, default ports):\n"
                "#   prometheus --config.file=deploy/prometheus/prometheus.local.yml"
            ),
        ),
    }


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for path, text in files().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The alert rules of deploy/prometheus are valid and behave as their unit tests say
(`promtool test rules`), and the generated scrape configs are up to date and valid."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from scripts import prometheus_config

FOLDER = prometheus_config.FOLDER


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("promtool is missing (Debian package: prometheus); CI must have it")
    pytest.skip("promtool is missing (Debian package: prometheus): apt-get install prometheus")


def run(*args: str, cwd: Path = FOLDER) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )


def test_alert_rules_are_valid() -> None:
    result = run("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    result = run("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((FOLDER / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((FOLDER / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts - tested == set(), f"alerts without a firing test: {sorted(alerts - tested)}"


def test_scrape_configs_are_up_to_date_and_valid(tmp_path: Path) -> None:
    """Checked where they run: beside alerts.yml and the metrics token file the services'
    jobs read (docker compose writes it from DR_METRICS_TOKEN; promtool wants it to exist)."""
    shutil.copy(prometheus_config.ALERTS, tmp_path / prometheus_config.ALERTS.name)
    (tmp_path / prometheus_config.TOKEN_FILE).write_text("a-metrics-token")
    for path, text in prometheus_config.files().items():
        assert path.read_text() == text, (
            f"{path.name} is stale: run `.venv/bin/python -m scripts.prometheus_config`"
        )
        (tmp_path / path.name).write_text(text)
        result = run("check", "config", path.name, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_services_jobs_send_the_metrics_token_and_the_edges_do_not() -> None:
    config = yaml.safe_load(prometheus_config.COMPOSE_FILE.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for job in prometheus_config.PLATFORM_JOBS:
        assert jobs[job]["authorization"] == {
            "type": "Bearer",
            "credentials_file": prometheus_config.TOKEN_FILE,
        }, job
    for job in ("site_provider", "host_agent"):
        assert "authorization" not in jobs[job], job

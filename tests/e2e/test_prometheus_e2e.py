"""A real Prometheus scrapes the running services (random ports, 1 s interval) and the series
the dashboards and alert rules rely on are readable through its query API: scrape health,
HTTP request counters, the DLQ counter after a malformed record, the producers-by-state gauge,
consumer lag, and the alert rules loaded. The services run with a metrics token
(DR_METRICS_TOKEN): Prometheus scrapes them with it, and the same target scraped without it is
down (401). The replication RPO and health series are read back during a replication in
test_prometheus_replication_e2e.py."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack
from shared import topics
from tests.support.kafka import produce
from tests.support.own_platform import own_platform
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.e2e

METRICS_TOKEN = secrets.token_urlsafe(32)
SERVICES = ("registration", "inventory", "policy")


@pytest.fixture(scope="module")
async def platform(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    """Its own prefix: the malformed record below must not reach other modules' readers."""
    plat = await own_platform(stack, "prom", tmp_path_factory.mktemp("prom-platform"))
    try:
        yield plat
    finally:
        await plat.close()


@pytest.fixture(scope="module")
def prometheus(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    for name in SERVICES:
        platform.start(name, {"DR_METRICS_TOKEN": METRICS_TOKEN})
    targets = {name: [f"127.0.0.1:{p.port}"] for name, p in platform.services.items()}
    targets["registration_without_token"] = targets["registration"]
    server = PrometheusServer(
        targets,
        tmp_path_factory.mktemp("prometheus"),
        metrics_token=METRICS_TOKEN,
        authorized_jobs=SERVICES,
    ).start()
    try:
        yield server
    finally:
        server.stop()


async def test_services_are_scraped(
    platform: Platform, prometheus: PrometheusServer, http: httpx.AsyncClient
) -> None:
    async def all_up() -> bool:
        result = await prometheus.query(http, 'up{job=~"registration|inventory|policy"}')
        return len(result) == 3 and all(r["value"][1] == "1" for r in result)

    await eventually(all_up, timeout=30, what="registration, inventory and policy scraped (up=1)")

    vault = await platform.new_vault(http, "prom")
    resp = await http.get(
        f"{platform.url('registration')}/v1/vaults/{vault['vault_id']}", headers=platform.admin()
    )
    assert resp.status_code == 200

    async def http_counted() -> list[dict[str, object]]:
        return await prometheus.query(
            http,
            'dr_http_requests_total{job="registration",route="/v1/vaults/{vault_id}",'
            'method="GET",status="200"}',
        )

    await eventually(http_counted, timeout=30, what="the GET of a vault counted")


async def test_dead_letters_are_counted(
    platform: Platform, prometheus: PrometheusServer, http: httpx.AsyncClient
) -> None:
    topic = topics.physical(topics.REGISTRATION_HEARTBEATS, platform.prefix)
    await produce(platform.stack.kafka, topic, b"{not json", key="prom-test")

    async def counted() -> list[dict[str, object]]:
        return await prometheus.query(
            http,
            'dr_dlq_messages_total{job="registration",topic="registration.heartbeats.v1",'
            'reason="malformed_json"} > 0',
        )

    await eventually(counted, timeout=30, what="dr_dlq_messages_total of the malformed record")

    async def lag_exported() -> list[dict[str, object]]:
        return await prometheus.query(
            http, 'dr_consumer_lag{job="registration",topic="registration.heartbeats.v1"}'
        )

    lag = await eventually(lag_exported, timeout=30, what="dr_consumer_lag of the heartbeats")
    assert all(float(str(r["value"][1])) >= 0 for r in lag)  # type: ignore[index]


async def test_producer_gauge_and_alert_rules(
    prometheus: PrometheusServer, http: httpx.AsyncClient
) -> None:
    async def producers() -> list[dict[str, object]]:
        return await prometheus.query(http, 'dr_registration_producers{job="registration"}')

    series = await eventually(producers, timeout=30, what="dr_registration_producers")
    labels = {(r["metric"]["kind"], r["metric"]["state"]) for r in series}  # type: ignore[index]
    assert labels == {(k, s) for k in ("agent", "provider") for s in ("Connected", "Disconnected")}

    data = await prometheus.api(http, "rules")
    alerts = {r["name"] for g in data["groups"] for r in g["rules"]}
    assert {"DRProducerDisconnected", "DRDeadLetters", "DRFailoverJobFailed"} <= alerts
    assert all(r["health"] != "err" for g in data["groups"] for r in g["rules"]), (
        "a rule fails to evaluate"
    )


async def test_metrics_answer_only_the_metrics_token(
    platform: Platform, prometheus: PrometheusServer, http: httpx.AsyncClient
) -> None:
    for name in SERVICES:
        url = f"{platform.url(name)}/metrics"
        refused = await http.get(url)
        assert refused.status_code == 401, name
        assert "Authorization: Bearer <DR_METRICS_TOKEN>" in refused.json()["error"]["message"]
        wrong = await http.get(url, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401, name
        assert "dr_http_requests_total" not in refused.text + wrong.text
        ok = await http.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert ok.status_code == 200 and "dr_http_requests_total" in ok.text, name

    async def refused_without_token() -> list[dict[str, object]]:
        return await prometheus.query(http, 'up{job="registration_without_token"} == 0')

    await eventually(refused_without_token, timeout=30, what="the scrape without the token down")
    targets = await prometheus.api(http, "targets")
    errors = {
        t["labels"]["job"]: t["lastError"]
        for t in targets["activeTargets"]
        if t["labels"]["job"] in (*SERVICES, "registration_without_token")
    }
    assert "401" in errors["registration_without_token"], errors
    assert all(errors[name] == "" for name in SERVICES), errors

"""docker-compose.yml runs every service of the repo, with healthchecks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
EDGE = {"host_agent": "host-agent", "site_provider": "site-provider"}
NOT_PROCESSES = {"cli"}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def repo_services() -> set[str]:
    return {
        p.parent.name
        for p in (REPO / "services").glob("*/__main__.py")
        if p.parent.name not in NOT_PROCESSES
    }


def test_every_service_in_the_repo_runs_in_compose() -> None:
    services = compose()["services"]
    commands = {" ".join(map(str, s.get("command", []))) for s in services.values()}
    for name in repo_services():
        assert any(f"services.{name}" in c for c in commands), f"services.{name} not in compose"


def test_every_service_has_a_healthcheck_and_the_stack_is_real() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        if name in ("bootstrap", "kafka-acls"):  # one-shot jobs
            continue
        assert "healthcheck" in svc, f"{name} has no healthcheck"
    assert services["kafka"]["image"].startswith("apache/kafka:3.9")
    broker = (REPO / "deploy" / "kafka" / "server.properties").read_text().splitlines()
    assert "process.roles=broker,controller" in broker


def test_kafka_in_compose_takes_only_certificates_and_acls() -> None:
    broker = (REPO / "deploy" / "kafka" / "server.properties").read_text().splitlines()
    for line in (
        "listener.security.protocol.map=CONTROLLER:SSL,SSL:SSL",
        "ssl.client.auth=required",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
    ):
        assert line in broker
    services = compose()["services"]
    for name, svc in services.items():
        env = svc.get("environment", {})
        if "KAFKA_BOOTSTRAP_SERVERS" in env:
            assert env["DR_KAFKA_SECURITY"] == "tls", name
            pki = sorted(v for v in svc["volumes"] if "deploy/" in v and "pki" in v)
            if "DR_KAFKA_CERT_FILE" not in env:
                # an edge host gets the CA's certificate, no key: it makes its own at
                # registration and presents the certificate the registration service issues
                assert pki == ["./deploy/pki/ca.pem:/etc/dr/pki/ca.pem:ro"], name
                assert "REGISTRATION_KEY" in " ".join(svc["command"]), name
            else:
                assert env["DR_KAFKA_CERT_FILE"].startswith("/etc/dr/pki/"), name
                assert "./deploy/pki:/etc/dr/pki:ro" in svc["volumes"], name
            assert env.get("DR_KAFKA_CERT_FILE") != "/etc/dr/pki/admin.pem" or (
                name == "kafka-acls"
            ), name
            # the edge-issuing CA's key is the registration service's alone
            holds_edge_ca = any("deploy/edge-ca" in v for v in svc.get("volumes", []))
            assert holds_edge_ca == (name == "registration"), name
    registration = services["registration"]["environment"]
    assert registration["DR_REGISTRATION_EDGE_CA_KEY_FILE"].startswith("/etc/dr/edge-ca/")
    assert services["postgres"]["image"].startswith("postgres:")


def test_services_wait_for_healthy_dependencies() -> None:
    services = compose()["services"]
    for name in repo_services():
        runs = [
            s for s in services.values() if f"services.{name}" in " ".join(s.get("command", []))
        ]
        for svc in runs:
            conditions = {d["condition"] for d in svc["depends_on"].values()}
            assert conditions <= {"service_healthy", "service_completed_successfully"}, name


def test_no_default_secrets_and_edges_get_only_their_registration_key() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    for well_known in ("change-me", "dr:dr@", "POSTGRES_PASSWORD: dr"):
        assert well_known not in text, well_known
    services = compose()["services"]
    for name in ("DR_ADMIN_TOKEN",):
        for svc_name in ("registration", "failover", "bootstrap"):
            value = services[svc_name]["environment"][name]
            assert value.startswith("${DR_ADMIN_TOKEN:?"), (svc_name, value)
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    for svc_name, svc in services.items():
        if svc_name.startswith(("site-provider", "host-agent")):
            env = svc["environment"]
            assert "DR_ADMIN_TOKEN" not in env and "DATABASE_URL" not in env, svc_name
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert "--web.enable-lifecycle" not in " ".join(services["prometheus"]["command"])


def test_the_services_metrics_need_a_token_prometheus_sends() -> None:
    """DR_METRICS_TOKEN is a required variable of every platform service and of Prometheus,
    which writes it beside its config for the services' jobs (credentials_file); edges never
    get it."""
    services = compose()["services"]
    required = "${DR_METRICS_TOKEN:?"
    for name in repo_services() - set(EDGE):
        for svc in (s for s in services.values() if f"services.{name}" in str(s.get("command"))):
            assert svc["environment"]["DR_METRICS_TOKEN"].startswith(required), name
    for svc_name, svc in services.items():
        if svc_name.startswith(("site-provider", "host-agent")):
            assert "DR_METRICS_TOKEN" not in svc["environment"], svc_name
    prometheus = services["prometheus"]
    assert prometheus["environment"]["DR_METRICS_TOKEN"].startswith(required)
    script = " ".join(prometheus["command"])
    assert "/run/prometheus/metrics.token" in script
    assert "--config.file=/run/prometheus/prometheus.yml" in script
    assert prometheus["tmpfs"] == ["/run/prometheus"]  # the token never reaches a disk


def test_postgres_in_compose_takes_only_tls_and_services_check_its_certificate() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    start = " ".join(postgres["entrypoint"])
    for option in (
        "-c ssl=on",
        "-c ssl_cert_file=/var/lib/postgresql/tls/server.pem",
        "-c ssl_key_file=/var/lib/postgresql/tls/server.key",
        "-c hba_file=/var/lib/postgresql/tls/pg_hba.conf",
        "install -o postgres -g postgres -m 600 /etc/dr/pki/postgres.key",
        "hostssl all all all scram-sha-256",
        "exec docker-entrypoint.sh postgres",
    ):
        assert option in start, option
    # TCP only over TLS: no `host` line (that would accept plain connections too)
    hba = start.split("printf '", 1)[1].split("'", 1)[0].split("\\n")
    assert [line.split()[0] for line in hba if line] == ["local", "hostssl"], hba
    assert "./deploy/pki/postgres.key:/etc/dr/pki/postgres.key:ro" in postgres["volumes"]
    assert not any("ca.key" in v for v in postgres["volumes"])
    urls = {
        name: svc["environment"]["DATABASE_URL"]
        for name, svc in services.items()
        if "DATABASE_URL" in svc.get("environment", {})
    }
    assert {"registration", "inventory", "policy", "replication", "failover"} <= set(urls)
    for name, url in urls.items():
        assert url.endswith("@postgres:5432/dr?sslmode=verify-full&sslrootcert=/etc/dr/pki/ca.pem")
        assert "./deploy/pki:/etc/dr/pki:ro" in services[name]["volumes"], name

"""The gateway (deploy/nginx): the merged OpenAPI document is up to date, every route of every
service goes to that service through the routing table, and the rendered config passes
`nginx -t`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from kit.procs import free_port
from scripts import gateway, openapi_merge


def test_openapi_document_is_up_to_date() -> None:
    assert json.loads(gateway.OPENAPI.read_text()) == json.loads(openapi_merge.render()), (
        "deploy/nginx/openapi.json is stale: run `.venv/bin/python -m scripts.openapi_merge`"
    )


def test_compose_config_is_up_to_date() -> None:
    assert gateway.COMPOSE_CONFIG.read_text() == gateway.compose_config(), (
        "deploy/nginx/nginx.compose.conf is stale: "
        "run `.venv/bin/python -m scripts.gateway compose`"
    )


def routes() -> list[tuple[re.Pattern[str], str]]:
    """(regex, service) of the template's `location ~` blocks, in order, then `/v1/`."""
    text = gateway.TEMPLATE.read_text()
    found = re.findall(
        r"location ~ (\^/v1/\S+) \{\s*proxy_pass http://\$(\w+)_upstream;", text, re.MULTILINE
    )
    table = [(re.compile(rx), svc) for rx, svc in found]
    assert "location /v1/ {\n            proxy_pass http://$registration_upstream;" in text
    table.append((re.compile(r"^/v1/"), "registration"))
    return table


def route_of(path: str) -> str | None:
    for rx, service in routes():
        if rx.search(path):
            return service
    return None


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def test_every_service_route_reaches_its_service() -> None:
    docs = openapi_merge.service_documents()
    assert {"registration", "inventory", "policy", "replication"} <= set(docs)
    for service, doc in docs.items():
        for path in doc["paths"]:
            if path in openapi_merge.OPS_PATHS:
                continue
            assert route_of(concrete(path)) == service, f"{path} of {service}"


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/v1/vaults/v1/jobs", "failover"),
        ("/v1/vaults/v1/jobs/j-1/tasks", "failover"),
        ("/v1/vaults/v1/recovery-plans/p/run", "failover"),
        ("/v1/vaults/v1/failovers", "failover"),
        ("/v1/vaults/v1/protected-items/i/recovery-points", "replication"),
        ("/v1/vaults/v1/vms", "inventory"),
        ("/v1/vaults/v1/vmsx", "registration"),
        ("/v1/vaults/v1/network-mappings", "policy"),
        ("/v1/vaults/v1/networks", "inventory"),
        ("/v1/vaults/v1/producers", "registration"),
        ("/v1/vaults", "registration"),
    ],
)
def test_routing_table(path: str, service: str) -> None:
    assert route_of(path) == service


def test_rendered_config_passes_nginx_check(tmp_path: Path) -> None:
    if gateway.nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (Debian package: nginx); CI must have it")
        pytest.skip("nginx is not installed (Debian package: nginx)")
    config = gateway.render_config(
        {"registration": "127.0.0.1:1", "failover": "failover:8105"},
        listen=f"127.0.0.1:{free_port()}",
        state_dir=tmp_path,
        resolver="127.0.0.11",
    )
    assert not re.search(r"\$\{[A-Z_]+\}", config)
    gateway.check_config(gateway.write_config(tmp_path, config), tmp_path)


def test_unknown_service_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown service"):
        gateway.render_config({"billing": "x:1"}, listen="127.0.0.1:1", state_dir=tmp_path)

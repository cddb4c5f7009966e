"""/metrics of every service and edge process (the shared HTTP edge): open while
DR_METRICS_TOKEN is unset or empty; with it set, 401 with a JSON error saying what to send
unless the request bears it as a bearer token."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from shared.edge_identity import EdgeSettings
from shared.http import create_app
from shared.settings import CommonSettings, ServiceSettings
from tests.support.http_app import StubRuntime

TOKEN = "m3tr1cs-t0ken-0f-the-platform-xyz"


def client(settings: CommonSettings) -> TestClient:
    return TestClient(create_app(StubRuntime(settings), title="t", description="t"))


@pytest.mark.parametrize("token", [None, ""])
def test_metrics_are_open_without_a_token(token: str | None) -> None:
    settings = ServiceSettings(metrics_token=None if token is None else SecretStr(token))
    resp = client(settings).get("/metrics")
    assert resp.status_code == 200
    assert "dr_http_requests_total" in resp.text


@pytest.mark.parametrize(
    "headers, says",
    [
        ({}, "send 'Authorization: Bearer <DR_METRICS_TOKEN>'"),
        ({"Authorization": f"Basic {TOKEN}"}, "send 'Authorization: Bearer <DR_METRICS_TOKEN>'"),
        ({"Authorization": "Bearer wrong"}, "the token sent is not the metrics token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "the token sent is not the metrics token"),
        ({"Authorization": "Bearer "}, "send 'Authorization: Bearer <DR_METRICS_TOKEN>'"),
    ],
    ids=["none", "basic", "wrong", "longer", "empty"],
)
def test_metrics_with_a_token_refuse_a_request_without_it(
    headers: dict[str, str], says: str
) -> None:
    resp = client(ServiceSettings(metrics_token=SecretStr(TOKEN))).get("/metrics", headers=headers)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    error = resp.json()["error"]
    assert error["status"] == 401 and says in error["message"]
    assert TOKEN not in resp.text
    assert "dr_http_requests_total" not in resp.text


def test_metrics_with_a_token_answer_the_bearer_and_leave_health_open() -> None:
    c = client(ServiceSettings(metrics_token=SecretStr(TOKEN)))
    resp = c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200
    assert "dr_http_requests_total" in resp.text
    assert c.get("/healthz").status_code == 200  # orchestrators' health checks need no token


def test_services_and_edges_read_the_token_from_dr_metrics_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DR_METRICS_TOKEN", TOKEN)
    for settings in (ServiceSettings(), EdgeSettings()):
        assert settings.metrics_token is not None
        assert settings.metrics_token.get_secret_value() == TOKEN
        resp = client(settings).get("/metrics")
        assert resp.status_code == 401

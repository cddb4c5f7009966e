"""The shared HTTP edge answers every error as the API's JSON error: input no route can store
(control characters, integers beyond 64 bits) is a 422 naming the field; a value the database
refuses as data a 422; a dependency that does not answer a 503 with `Retry-After`; anything
else a JSON 500."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from fastapi import Query
from fastapi.testclient import TestClient
from pydantic import BaseModel

from shared.http import create_app, screen_json, screen_query
from shared.readmodels import NotYetKnown, until_known
from tests.support.http_app import StubRuntime


class Body(BaseModel):
    name: str
    count: int = 0


def client() -> TestClient:
    app = create_app(StubRuntime(), title="t", description="t")

    @app.post("/things")
    async def create(body: Body) -> dict[str, Any]:
        return body.model_dump()

    @app.get("/things")
    async def listing(offset: int = Query(0, ge=0)) -> dict[str, int]:
        return {"offset": offset}

    @app.get("/db-down")
    async def db_down() -> None:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")

    @app.get("/db-restarting")
    async def db_restarting() -> None:
        raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")

    @app.get("/untranslatable")
    async def untranslatable() -> None:
        raise asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence")

    @app.get("/nul-path")
    async def nul_path() -> None:
        raise ValueError("embedded null byte")

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("boom")

    return TestClient(app, raise_server_exceptions=False)


def error_of(resp: Any, status: int) -> str:
    assert resp.status_code == status, resp.text
    message = resp.json()["error"]["message"]
    assert resp.json()["error"]["status"] == status
    return str(message)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"name": "a\\u0000b"}', "name"),
        ('{"name": "ok", "count": 100000000000000000000000000000}', "count"),
        ('{"name": "\\u001b[31m"}', "name"),
        ('{"name": "ok", "tags": {"x\\u0000": 1}}', "tags.x"),
    ],
)
def test_bad_values_in_a_json_body_are_422_naming_the_field(body: str, field: str) -> None:
    with client() as c:
        resp = c.post("/things", content=body, headers={"content-type": "application/json"})
    message = error_of(resp, 422)
    assert field in message and ("control character" in message or "out of range" in message)


def test_escaped_backslashes_and_newlines_are_fine() -> None:
    with client() as c:
        resp = c.post(
            "/things",
            content='{"name": "C:\\\\u0000dir\\nline\\ttab", "count": 9223372036854775807}',
            headers={"content-type": "application/json"},
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["name"] == "C:\\u0000dir\nline\ttab"


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("offset=1000000000000000000000000000000", "'offset'"),
        ("offset=-9223372036854775809", "'offset'"),
        ("name=a%00b", "U+0000"),
        ("name=%1B", "U+001B"),
    ],
)
def test_bad_query_values_are_422(query: str, needle: str) -> None:
    with client() as c:
        resp = c.get(f"/things?{query}")
    assert needle in error_of(resp, 422)


def test_a_control_character_in_the_path_is_422() -> None:
    with client() as c:
        resp = c.get("/things%01")
    assert "path" in error_of(resp, 422)


def test_dependency_down_is_503_with_reason_and_retry_after() -> None:
    with client() as c:
        for path in ("/db-down", "/db-restarting"):
            resp = c.get(path)
            assert "PostgreSQL" in error_of(resp, 503)
            assert resp.headers["retry-after"].isdigit()


def test_values_the_database_refuses_are_422() -> None:
    with client() as c:
        assert "cannot be stored" in error_of(c.get("/untranslatable"), 422)
        assert "NUL" in error_of(c.get("/nul-path"), 422)


def test_anything_else_is_a_json_500() -> None:
    with client() as c:
        assert "RuntimeError" in error_of(c.get("/bug"), 500)


def test_screens_pass_ordinary_input() -> None:
    assert screen_query("/v1/vaults/x/vms", b"name=db01&offset=20") is None
    assert screen_json(b'{"a": [1, 2, "x"], "b": 12345678901234567}') is None


async def test_a_fact_not_yet_known_is_waited_for_then_409_with_retry_after() -> None:
    calls = 0

    async def soon() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise NotYetKnown("VM v1 is not known in a paired cloud")
        return "done"

    assert await until_known(soon, timeout=2, interval=0.01) == "done"

    async def never() -> str:
        raise NotYetKnown("VM v1 is not known in a paired cloud")

    with pytest.raises(NotYetKnown):
        await until_known(never, timeout=0.05, interval=0.01)
    app = create_app(StubRuntime(), title="t", description="t")

    @app.get("/enable")
    async def enable() -> None:
        raise NotYetKnown("VM v1 is not known in a paired cloud")

    with TestClient(app) as c:
        resp = c.get("/enable")
    assert "try again in a moment" in error_of(resp, 409)
    assert resp.headers["retry-after"] == "2"

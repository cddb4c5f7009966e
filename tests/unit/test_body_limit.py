"""A request body over the limit answers 413, whether it declares its length or is chunked
(no Content-Length: counted as it arrives)."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from shared.http import BodyLimitMiddleware


class Body(BaseModel):
    text: str


def app() -> FastAPI:
    api = FastAPI()

    @api.post("/echo")
    async def echo(body: Body) -> dict[str, int]:
        return {"length": len(body.text)}

    api.add_middleware(BodyLimitMiddleware, limit=1024)
    return api


def chunks(total: int) -> Iterator[bytes]:
    yield b'{"text": "'
    for _ in range(total // 100):
        yield b"x" * 100
    yield b'"}'


def test_a_chunked_body_over_the_limit_answers_413() -> None:
    client = TestClient(app())
    small = client.post("/echo", content=chunks(500), headers={"content-type": "application/json"})
    assert small.status_code == 200, small.text
    big = client.post("/echo", content=chunks(5000), headers={"content-type": "application/json"})
    assert big.status_code == 413, big.text
    assert "too large" in big.json()["error"]["message"]
    declared = client.post("/echo", json={"text": "x" * 5000})
    assert declared.status_code == 413

"""The HTTP edge every service shares: FastAPI app with `/healthz`, `/metrics`, OpenAPI,
uniform JSON errors (`{"error": {"status", "message", "details"}}`) that say what to fix, a
request-body size limit, and per-route request metrics."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("dr_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_SECONDS = Histogram(
    "dr_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def error_body(status: int, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"status": status, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}


class BodyLimitMiddleware:
    """Refuses request bodies over `limit` bytes with 413, by header or by counting."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._too_large(scope, receive, send)
                return
        seen = 0
        too_large = False

        async def limited() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge()
            return message

        async def guarded(message: Message) -> None:
            if not too_large:  # the app's answer to a body cut short (a 400) is replaced
                await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited, guarded)
        if too_large:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            error_body(413, f"request body too large: the limit is {self.limit} bytes"),
            status_code=413,
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def _validation_message(
    exc: RequestValidationError, content_type: str
) -> tuple[int, str, list[dict[str, Any]]]:
    details = []
    status = 422
    errors = exc.errors()
    if (
        "json" not in content_type
        and errors
        and all(tuple(e.get("loc", ())) == ("body",) for e in errors)
    ):
        return 415, "send the request body as JSON with 'Content-Type: application/json'", []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        if err.get("type") == "json_invalid":
            status = 400
        field = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = f"unknown field '{loc[-1]}': remove it"
        details.append({"field": field or "(body)", "where": loc[0] if loc else "", "msg": msg})
    if status == 400:
        return status, "malformed JSON body: send a valid JSON document", details
    summary = "; ".join(f"{d['field']}: {d['msg']}" for d in details[:5])
    return status, f"invalid request: {summary}", details


class Lifecycle(Protocol):
    """What the HTTP edge needs of a process runtime (`Runtime`, `EdgeRuntime`)."""

    settings: Any

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def health(self) -> dict[str, Any]: ...


L = TypeVar("L", bound=Lifecycle)


def create_app(
    runtime: L,
    *,
    title: str,
    description: str,
    on_start: Callable[[L], Awaitable[None]] | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        app.state.pool = getattr(runtime, "pool", None)
        if on_start is not None:
            await on_start(runtime)
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title=title, description=description, version="1.0.0", lifespan=lifespan)
    app.state.settings = runtime.settings
    app.state.runtime = runtime
    app.add_middleware(BodyLimitMiddleware, limit=runtime.settings.max_body_bytes)

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        HTTP_REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        HTTP_SECONDS.labels(request.method, path).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        status, message, details = _validation_message(exc, content_type)
        return JSONResponse(error_body(status, message, details), status_code=status)

    @app.get("/healthz", tags=["ops"], summary="Liveness and readiness of this service")
    async def healthz() -> JSONResponse:
        report = await runtime.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", include_in_schema=True)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app

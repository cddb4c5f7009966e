"""The HTTP edge every service and edge process shares: FastAPI app with `/healthz`,
`/metrics` (behind `DR_METRICS_TOKEN` when set: `shared.auth.metrics_access`), OpenAPI, uniform
JSON errors (`{"error": {"status", "message", "details"}}`) that say what to fix, a
request-body size limit, and per-route request metrics.

Every error is that JSON shape, whatever raised it:
- input no route can use is refused at the door (`InputScreenMiddleware`, 422): a NUL or
  other control character (U+0000-U+001F except tab, line feed and carriage return) in the
  path, a query parameter or any string of a JSON body, and an integer outside the 64-bit
  range PostgreSQL stores (a query parameter or a JSON number);
- what still reaches the database and is refused there as data (asyncpg `DataError`: a value
  out of range, a character the database cannot store) is a 422 naming the value;
- a dependency that does not answer (PostgreSQL down or restarting, the broker unreachable)
  is a 503 with the reason and `Retry-After`, not a 500;
- anything else is a JSON 500 (and a traceback in the service's log).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl

import asyncpg
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import metrics_access
from shared.readmodels import NotYetKnown

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("dr_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_SECONDS = Histogram(
    "dr_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


# /healthz statuses answered with HTTP 200 (a standby instance is healthy); others: 503
HEALTHY_STATUSES = ("ok", "standby")


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


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# A control character a request may not carry: C0 except tab, line feed, carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# In a JSON text: an escaped control character (an odd run of backslashes before `u00XX`),
# or a run of 19+ digits (|n| >= 10**18: worth a precise look). Bodies without either skip
# the parse below.
_SUSPECT_JSON = re.compile(rb"(?<!\\)(?:\\\\)*\\u00(?:0[0-8bBcCeEfF]|1[0-9a-fA-F])|[0-9]{19,}")
_SUSPECT_QUERY = re.compile(rb"%(?:0[0-8bBcCeEfF]|1[0-9a-fA-F])|[\x00-\x1f]|[0-9]{19,}")
_INTEGER = re.compile(r"^\s*[+-]?[0-9]+\s*$")


def _describe(value: str) -> str:
    found = _CONTROL.search(value)
    assert found is not None
    return f"U+{ord(found.group()):04X}"


def screen_value(where: str, value: Any) -> str | None:
    """What is wrong with one input value (None: nothing): a control character in a string,
    an integer outside 64 bits. Containers are walked; `where` names the field."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            return (
                f"{where}: contains the control character {_describe(value)}: remove it "
                "(text may not hold NUL or other control characters except tab and newline)"
            )
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            return f"{where}: {value} is out of range: integers are at most {INT64_MAX}"
        return None
    if isinstance(value, dict):
        for key, inner in value.items():
            problem = screen_value(f"{where}.{key}" if where else str(key), key) or screen_value(
                f"{where}.{key}" if where else str(key), inner
            )
            if problem:
                return problem
    if isinstance(value, list):
        for n, inner in enumerate(value):
            problem = screen_value(f"{where}[{n}]", inner)
            if problem:
                return problem
    return None


def screen_query(path: str, query_string: bytes) -> str | None:
    """What is wrong with a request's path or query parameters (None: nothing)."""
    if _CONTROL.search(path):
        return f"path: contains the control character {_describe(path)}: remove it"
    if not _SUSPECT_QUERY.search(query_string):
        return None
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        where = f"query parameter '{name}'"
        if _CONTROL.search(name):
            return f"{where}: its name contains the control character {_describe(name)}"
        if _INTEGER.match(value):
            problem = screen_value(where, int(value))
        else:
            problem = screen_value(where, value)
        if problem:
            return problem
    return None


def screen_json(body: bytes) -> str | None:
    """What is wrong with a JSON body's values (None: nothing, or not JSON: the route's own
    validation says so)."""
    if not _SUSPECT_JSON.search(body):
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return screen_value("", document)


class InputScreenMiddleware:
    """Refuses (422) a request whose path, query or JSON body holds a value no route can
    store: a control character or an integer beyond 64 bits (see `screen_value`). Bodies are
    held to check them, so it sits inside `BodyLimitMiddleware`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = screen_query(scope.get("path", ""), scope.get("query_string", b""))
        if problem:
            await _refuse(problem, scope, receive, send)
            return
        content_type = dict(scope.get("headers", [])).get(b"content-type", b"")
        if b"json" not in content_type:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message), send)
                return
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        problem = screen_json(body)
        if problem:
            await _refuse(problem, scope, receive, send)
            return
        await self.app(scope, _replay([body], None, receive), send)


def _replay(bodies: list[bytes], first: Message | None, then: Receive | None = None) -> Receive:
    """A `receive` that gives the held body once, then defers to `then` (disconnects)."""
    pending: list[Message] = [first] if first is not None else []
    pending += [{"type": "http.request", "body": b, "more_body": False} for b in bodies]

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


async def _refuse(problem: str, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(
        error_body(422, f"invalid request: {problem}", [{"msg": problem}]), status_code=422
    )
    await response(scope, receive, send)


def not_yet_known_response(exc: NotYetKnown) -> JSONResponse:
    return JSONResponse(
        error_body(409, f"{exc.message}; if it was just created, try again in a moment"),
        status_code=409,
        headers={"Retry-After": "2"},
    )


# A dependency that does not answer: the request may succeed in a moment.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cannot connect now
    asyncpg.TooManyConnectionsError,
    KafkaConnectionError,
    KafkaTimeoutError,
    ConnectionError,
    TimeoutError,
)
_CONNECTION_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ETIMEDOUT,
    errno.EPIPE,
}
RETRY_AFTER_SECONDS = 5


def _dependency(exc: BaseException) -> str:
    module = type(exc).__module__
    if module.startswith("asyncpg") or isinstance(exc, (ConnectionError, OSError)):
        return "the database (PostgreSQL)"
    if module.startswith("aiokafka"):
        return "the event broker (Kafka)"
    return "a dependency"


def unavailable_response(exc: BaseException) -> JSONResponse:
    what = _dependency(exc)
    reason = str(exc).strip() or type(exc).__name__
    return JSONResponse(
        error_body(
            503,
            f"service unavailable: {what} does not answer ({type(exc).__name__}: {reason}); "
            f"retry in a moment, and check /healthz of the service if it persists",
        ),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def data_error_response(exc: Exception) -> JSONResponse:
    """A value the database refused as data (class 22: out of range, untranslatable)."""
    reason = str(exc).strip()
    if isinstance(exc, ValueError) and "null" in reason:
        reason = "a value contains a NUL character: remove it"
    return JSONResponse(
        error_body(422, f"invalid request: a value cannot be stored: {reason}"),
        status_code=422,
    )


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
    app.add_middleware(InputScreenMiddleware)
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

    @app.exception_handler(NotYetKnown)
    async def not_yet_known(request: Request, exc: NotYetKnown) -> JSONResponse:
        return not_yet_known_response(exc)

    @app.exception_handler(asyncpg.DataError)
    async def data_error(request: Request, exc: asyncpg.DataError) -> JSONResponse:
        return data_error_response(exc)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning(
            "dependency unavailable while answering",
            extra={"path": request.url.path, "error": repr(exc)},
        )
        return unavailable_response(exc)

    for error in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, unavailable)

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError) -> Response:
        if exc.errno in _CONNECTION_ERRNOS:
            return await unavailable(request, exc)
        raise exc

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> Response:
        if "null byte" in str(exc) or "null character" in str(exc):
            return data_error_response(exc)
        raise exc

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(
                500,
                f"internal error ({type(exc).__name__}): the service's log has the details",
            ),
            status_code=500,
        )

    @app.get("/healthz", tags=["ops"], summary="Liveness and readiness of this service")
    async def healthz() -> JSONResponse:
        report = await runtime.health()
        healthy = report["status"] in HEALTHY_STATUSES
        return JSONResponse(report, status_code=200 if healthy else 503)

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics",
        include_in_schema=True,
        dependencies=[Depends(metrics_access)],
    )
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app

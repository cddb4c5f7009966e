"""The CLI's HTTP side: which URL serves which service, and calls that turn every failure into
an `ApiError` carrying the service's own message."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

SERVICES = ("registration", "inventory", "policy", "replication", "failover")
LOCAL_DEFAULTS = {
    "registration": "http://127.0.0.1:8101",
    "inventory": "http://127.0.0.1:8102",
    "policy": "http://127.0.0.1:8103",
    "replication": "http://127.0.0.1:8104",
    "failover": "http://127.0.0.1:8105",
}


class ApiError(Exception):
    """A refused or failed call; `status` is the HTTP status (0: the service was unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def service_urls(url: str | None, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Base URL per service: `--url` (one gateway for all) if given, else `DR_<SERVICE>_URL`,
    else `DR_URL`, else the service's local default port."""
    out = {}
    for name in SERVICES:
        chosen = url or env.get(f"DR_{name.upper()}_URL") or env.get("DR_URL")
        out[name] = (chosen or LOCAL_DEFAULTS[name]).rstrip("/")
    return out


def error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip() or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "detail" in body:
            return str(body["detail"])
    return str(body)


@dataclass
class Api:
    urls: dict[str, str]
    token: str
    timeout: float = 15.0

    def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        url = f"{self.urls[service]}{path}"
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            resp = httpx.request(
                method,
                url,
                json=body,
                params=query,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach the {service} service at {url}: {exc}") from None
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, error_message(resp))
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise ApiError(
                resp.status_code, f"{service} answered with non-JSON: {resp.text[:200]}"
            ) from None

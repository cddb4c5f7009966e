"""The base of every event payload, apart from the envelope that carries it and the registry of
event types (both depend on it; it depends on neither)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EventPayload(BaseModel):
    """Base of every event payload: immutable, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

"""Registry of event types: name + schema version -> payload model, and the topic it goes on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from shared.schemas.base import EventPayload


@dataclass(frozen=True)
class EventType:
    name: str
    version: int
    topic: str
    model: type[EventPayload]
    signed: bool
    description: str
    # What the signature covers of the payload (a JSON dict -> a JSON dict); None: all of it.
    signed_view: SignedView | None = None


SignedView = Callable[[dict[str, Any]], dict[str, Any]]

EVENT_TYPES: dict[tuple[str, int], EventType] = {}
_BY_MODEL: dict[type[EventPayload], EventType] = {}

P = TypeVar("P", bound=type[EventPayload])


def event_type(
    name: str,
    *,
    topic: str,
    version: int = 1,
    signed: bool = False,
    signed_view: SignedView | None = None,
) -> Callable[[P], P]:
    """Class decorator registering a payload model as event `name` v`version` on `topic`.

    `signed=True` marks events that edge producers publish: consumers require a valid Ed25519
    signature by the producer's registered public key.
    `signed_view` (signed types only): the part of the payload (as JSON) the signature
    covers, when not all of it, e.g. block hashes instead of block bytes that the consumer
    checks against those hashes anyway. It must keep everything that gives the event its
    meaning; used by both `Envelope.signed_with` and `Envelope.signature_valid`.
    """
    if signed_view is not None and not signed:
        raise ValueError(f"{name}: a signed view needs signed=True")

    def register(model: P) -> P:
        key = (name, version)
        if key in EVENT_TYPES:
            raise ValueError(f"event type {name} v{version} registered twice")
        et = EventType(
            name, version, topic, model, signed, (model.__doc__ or "").strip(), signed_view
        )
        EVENT_TYPES[key] = et
        _BY_MODEL[model] = et
        return model

    return register


def payload_model(name: str, version: int) -> EventType | None:
    return EVENT_TYPES.get((name, version))


def type_name_of(model: type[EventPayload]) -> tuple[str, int]:
    et = _BY_MODEL[model]
    return et.name, et.version


def topic_of(model: type[EventPayload]) -> str:
    return _BY_MODEL[model].topic

"""What a replicated item needs from the agent around it (signing, agent events, where its
cycles go) and the error a command about it answers with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.host_agent.cycles import Signer, SinkFactory
from shared.schemas.envelope import EventPayload

Emit = Callable[[EventPayload], Awaitable[None]]


@dataclass(frozen=True)
class Wiring:
    """How an item reaches the outside: signing, agent events, where cycles go."""

    sign: Signer
    emit: Emit  # an agent event on `agent.events.v1` (retried until sent)
    sink: SinkFactory  # (item id, cycle seq) -> where a cycle goes (Kafka)


class CommandFailed(Exception):
    """The command can't be carried out; the message goes back in CommandCompleted, with
    `details` in its result (what the service needs to act on the failure)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}

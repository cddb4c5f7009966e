"""What the failover service's repositories share (a connection or pool, a row as a
dataclass) and the outbox with the questions it asked and their answers. Each aggregate has its
own repository: jobs and tasks (job_repository.py), items' failover state, reverse-replication
links and test networks (item_failover_repository.py), recovery plans (plan_repository.py);
the read models of other services' events are in read_model_repository.py."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from shared import outbox
from shared.kafka.decode import Rejected
from shared.schemas.envelope import EventPayload

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

PRODUCER_ID = "service:failover"

Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool
R = TypeVar("R", bound="DataclassInstance")


REPLICATION = "service:replication"


async def emit(
    conn: asyncpg.Connection, vault_id: uuid.UUID, payload: EventPayload, key: str
) -> None:
    """Publish `payload` (through the outbox); a question (an agent's command, a request to
    the replication service) is recorded with whom it was asked of, in the same transaction."""
    question = _question(payload)
    if question is not None:
        await conn.execute(
            "INSERT INTO questions (request_id, vault_id, addressee) VALUES ($1,$2,$3)"
            " ON CONFLICT (request_id) DO NOTHING",
            question[0],
            vault_id,
            question[1],
        )
    await outbox.emit(conn, payload, vault_id=vault_id, key=key, producer_id=PRODUCER_ID)


def _question(payload: EventPayload) -> tuple[uuid.UUID, str] | None:
    command_id, agent_id = getattr(payload, "command_id", None), getattr(payload, "agent_id", None)
    if isinstance(command_id, uuid.UUID) and isinstance(agent_id, uuid.UUID):
        return command_id, str(agent_id)
    request_id = getattr(payload, "request_id", None)
    if isinstance(request_id, uuid.UUID):
        return request_id, REPLICATION
    return None


async def check_answerer(
    conn: asyncpg.Connection, request_id: uuid.UUID, vault_id: uuid.UUID, producer_id: str
) -> bool:
    """True if `request_id` is a question of ours and this answer comes from whom it was asked
    of, in its vault; False if it is not ours (nothing to do). Raises Rejected otherwise."""
    row = await conn.fetchrow(
        "SELECT vault_id, addressee FROM questions WHERE request_id = $1", request_id
    )
    if row is None:
        return False
    if row["vault_id"] != vault_id:
        raise Rejected("vault_mismatch", f"{request_id} was asked in another vault")
    if row["addressee"] is not None and row["addressee"] != producer_id:
        raise Rejected(
            "wrong_answerer",
            f"{request_id} was asked of {row['addressee']}, not {producer_id}",
        )
    return True


# ------------------------------------------------------------------ answers


@dataclass(frozen=True)
class AnswerRow:
    """An agent's or the replication service's answer to a step's command or request, as it
    sent it."""

    request_id: uuid.UUID
    kind: str
    ok: bool
    error: str
    result: dict[str, object]
    at: datetime


def from_record(cls: type[R], row: asyncpg.Record) -> R:
    """The row as the dataclass `cls` (whose fields name the row's columns)."""
    return cls(**{f.name: row[f.name] for f in fields(cls)})


async def answer(conn: Conn, request_id: uuid.UUID) -> AnswerRow | None:
    row = await conn.fetchrow("SELECT * FROM answers WHERE request_id = $1", request_id)
    return from_record(AnswerRow, row) if row else None


async def save_answer(
    conn: asyncpg.Connection,
    request_id: uuid.UUID,
    kind: str,
    ok: bool,
    error: str,
    result: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO answers (request_id, kind, ok, error, result) VALUES ($1,$2,$3,$4,$5)"
        " ON CONFLICT (request_id) DO NOTHING",
        request_id,
        kind,
        ok,
        error,
        result,
    )

"""What an inbox handler gets, how a consumed message becomes it, and which failures are outages."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from aiokafka import ConsumerRecord
from sqlalchemy.exc import DBAPIError

from app.wire.codec import decode, schema_for_topic
from app.wire.schemas import EventSchema

#: SQLSTATE classes and codes of a failure that is the database's state, not the event's:
#: connection (08), operator intervention such as a shutdown (57P), insufficient resources
#: (53), serialization failure and deadlock (40001, 40P01). Retried without limit.
_TRANSIENT_STATES = ("08", "57P", "53", "40001", "40P01")


@dataclass(frozen=True)
class InboxEvent:
    """One event as a handler sees it: the envelope's fields and the data, decoded."""

    topic: str
    partition: int
    offset: int
    event_id: str
    entity: str
    key: str
    sequence: int
    op: str
    schema_version: int
    service: str
    occurred_at: datetime
    #: The aggregate's state after the event (None for a delete).
    data: dict[str, Any] | None
    #: The consumed message, for its dead letter.
    message: ConsumerRecord = field(repr=False, compare=False)

    @property
    def sequenced(self) -> bool:
        """Whether the event carries a per-key sequence (access events, op `read`, do not)."""
        return self.op != "read"


def to_event(record: ConsumerRecord, schema_of: Callable[[str], EventSchema] = schema_for_topic) -> InboxEvent:
    """Decode a consumed message with its topic's schema (by default from the topic's name,
    `<entity>-v<N>`: any version)."""
    if record.value is None:
        raise ValueError("empty message value")
    event = decode(schema_of(record.topic), record.value)
    return InboxEvent(
        topic=record.topic, partition=record.partition, offset=record.offset,
        event_id=str(event["event_id"]), entity=event["entity"], key=event["key"],
        sequence=event["sequence"], op=event["op"], schema_version=event["schema_version"],
        service=event["service"], occurred_at=event["occurred_at"], data=event["data"], message=record)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the database or network is unavailable, so the
    same transaction may succeed later, rather than that the event or the handler is wrong."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, (OSError, ConnectionError, asyncio.TimeoutError,
                                asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.InterfaceError)):
            return True
        state = getattr(current, "sqlstate", None) or getattr(getattr(current, "orig", None), "sqlstate", None)
        if isinstance(state, str) and state.startswith(_TRANSIENT_STATES):
            return True
        current = current.__cause__ or getattr(current, "orig", None)
    return False

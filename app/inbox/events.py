"""What an inbox handler gets, and how a consumed message becomes it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import ConsumerRecord

from app.wire.messages import decode, schema_for_topic
from app.wire.schemas import EventSchema


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



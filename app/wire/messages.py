"""The messages this code consumes and produces, and the event envelope, built in one place.

`Incoming` is what an agent keeps of a consumed message; `Outgoing` is every message it or the
relay produces (events, down-converted copies, view updates, dead letters). `envelope` builds
the record every event topic carries, at `MESSAGE_VERSION`, from an outbox row.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.wire.codec import MESSAGE_VERSION

if TYPE_CHECKING:
    import faust

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Incoming:
    """What an agent needs of one consumed message."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    headers: Headers


@dataclass(frozen=True)
class Outgoing:
    """One message to produce (`partition` None: the key's, by Kafka's default partitioner)."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None
    headers: Headers
    timestamp: float | None = None  # seconds; None: now


def incoming(message: faust.types.Message) -> Incoming:
    """The parts of a consumed Faust message an agent keeps."""
    headers = message.headers or ()
    return Incoming(message.key, message.value, message.partition, message.offset,
                    list(headers.items()) if isinstance(headers, Mapping) else list(headers))


def envelope(row: Mapping[str, Any]) -> dict[str, Any]:
    """The event record of an outbox row: the envelope's fields and the entity's data."""
    data = row["data"]
    return {
        "event_id": str(row["event_id"]),
        "message_version": MESSAGE_VERSION,
        "schema_version": row["schema_version"],
        "service": row["service"],
        "entity": row["entity"],
        "key": row["key"],
        "op": row["op"],
        "occurred_at": row["occurred_at"],
        "sequence": row["sequence"],
        "data": json.loads(data) if isinstance(data, str) else data,
    }

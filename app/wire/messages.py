"""The messages this code consumes and produces, and the event record they carry, in one place.

`Incoming` is what an agent keeps of a consumed message; `Outgoing` is every message an agent or
the relay produces (events, down-converted copies, view updates, dead letters). An event's value
is its record: the envelope (`envelope`, at `MESSAGE_VERSION`, built from an outbox row) around
the entity's data, in plain Avro binary, with its CloudEvents attributes as Kafka headers.
"""
from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from uuid import UUID

import fastavro

from app.wire.convert import convert_record
from app.wire.schemas import EventSchema, load

if TYPE_CHECKING:
    import faust

#: Version of the envelope format itself (the fields around `data`).
MESSAGE_VERSION = 1
CONTENT_TYPE = "application/avro"


def encode(schema: EventSchema, record: dict[str, Any]) -> bytes:
    """Plain Avro binary (no container, no framing) of a full event record."""
    data = record.get("data")
    branch = schema.data_union_branch
    if branch is not None and isinstance(data, dict):
        # Naming the union branch spares fastavro trying each branch (~30% of the encode).
        record = {**record, "data": (branch, data)}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


def decode(schema: EventSchema, value: bytes) -> dict[str, Any]:
    """The event record in `value`, read with `schema` as both writer and reader schema."""
    return fastavro.schemaless_reader(io.BytesIO(value), schema.parsed)  # type: ignore[return-value]  # a record schema reads a dict


def ce_headers(schema: EventSchema, event_id: str | UUID, service: str, op: str,
               occurred_at: datetime) -> list[tuple[str, bytes]]:
    """CloudEvents Kafka binding, binary mode: the event's attributes as `ce_*` headers."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", str(event_id).encode()),
        ("ce_source", f"/services/{service}".encode()),
        ("ce_type", f"{schema.entity}.{op}.v{schema.version}".encode()),
        ("ce_time", occurred_at.astimezone(timezone.utc).isoformat().encode()),
        ("ce_dataschema", schema.dataschema.encode()),
        ("content-type", CONTENT_TYPE.encode()),
    ]


def encode_message(schema: EventSchema, record: dict[str, Any]) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Value and CloudEvents headers of one event record in `schema`'s version."""
    headers = ce_headers(schema, record["event_id"], record["service"], record["op"], record["occurred_at"])
    return encode(schema, record), headers


def downconvert(value: bytes, source: EventSchema, target: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A `source`-version message as version `target`: same event id, key and sequence.

    The relay's dual-publish goes through `encode_message(convert_record(...))` too, so both
    ways of serving an old version give byte-identical values and identical headers.
    """
    return downconvert_record(decode(source, value), source, target)


def downconvert_record(record: dict[str, Any], source: EventSchema, target: int
                       ) -> tuple[bytes, list[tuple[str, bytes]]]:
    """`downconvert` of an already decoded `source` record (the stream job decodes once for all jobs)."""
    if record["schema_version"] != source.version:
        raise ValueError(f"message says schema_version {record['schema_version']} "
                         f"on a v{source.version} topic")
    return encode_message(load(source.entity, target), convert_record(record, target))


def schema_for_topic(topic: str) -> EventSchema:
    """The schema of a `<entity>-v<N>` topic."""
    entity, _, version = topic.rpartition("-v")
    return load(entity, int(version))


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

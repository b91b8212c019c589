"""Loads the Avro schemas in `schemas/`: one per entity and version, each the full event record."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import fastavro

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"  # schemas/ beside app/


@dataclass(frozen=True)
class EventSchema:
    """One `.avsc` file: the raw JSON, its parsed fastavro form, and where it lives."""

    entity: str
    version: int
    path: Path
    raw: dict[str, Any]
    parsed: Any

    @property
    def topic(self) -> str:
        """The topic carrying this version, e.g. `orders-v2`."""
        return topic_name(self.entity, self.version)

    @property
    def dataschema(self) -> str:
        """The CloudEvents `dataschema` URI naming this schema."""
        return f"urn:microservice-events:schemas:{self.entity}:v{self.version}"

    @cached_property
    def data_union_branch(self) -> str | None:
        """Full name of the `data` record when `data` is a `["null", record]` union, else None."""
        declared = next(f["type"] for f in self.raw["fields"] if f["name"] == "data")
        if not isinstance(declared, list):
            return None
        record = non_null(declared)
        namespace = record.get("namespace", self.raw.get("namespace"))
        return f"{namespace}.{record['name']}" if namespace else record["name"]

    def data_fields(self) -> list[dict[str, Any]]:
        """The fields of the `data` record (the entity state), unwrapped from its null union."""
        return self._data_fields

    @cached_property
    def _data_fields(self) -> list[dict[str, Any]]:
        # Once per schema: down-conversion asks for every event.
        return record_fields(field_type(self.raw, "data"))


def topic_name(entity: str, version: int) -> str:
    """`<entity>-v<N>`, the wire name of a topic."""
    return f"{entity}-v{version}"


def dlq_topic(source_topic: str) -> str:
    """The dead-letter topic of a source topic."""
    return f"{source_topic}.dlq"


#: The topic of access events (reads), raised by every service.
ACCESS_TOPIC = "access-v1"


def field_type(record: dict[str, Any], name: str) -> Any:
    """The type of field `name` of an Avro record, with a `["null", T]` union reduced to T."""
    for field in record["fields"]:
        if field["name"] == name:
            return non_null(field["type"])
    raise KeyError(f"record {record.get('name')} has no field {name!r}")


def non_null(avro_type: Any) -> Any:
    """T for `["null", T]`, the type itself otherwise."""
    if isinstance(avro_type, list):
        rest = [t for t in avro_type if t != "null"]
        return rest[0] if len(rest) == 1 else avro_type
    return avro_type


def record_fields(avro_type: Any) -> list[dict[str, Any]]:
    """The fields of a record type, `[]` for anything else."""
    return avro_type["fields"] if isinstance(avro_type, dict) and avro_type.get("type") == "record" else []


@cache
def load(entity: str, version: int) -> EventSchema:
    """The schema of `<entity>` at `version`, from `schemas/<entity>/v<version>.avsc`."""
    path = SCHEMA_DIR / entity / f"v{version}.avsc"
    if not path.exists():
        raise LookupError(f"no schema for {entity} v{version}: {path} does not exist")
    raw = json.loads(path.read_text())
    return EventSchema(entity, version, path, raw, fastavro.parse_schema(raw))


def versions(entity: str) -> list[int]:
    """Every version of `entity` that has a schema file, ascending."""
    return sorted(int(p.stem[1:]) for p in (SCHEMA_DIR / entity).glob("v*.avsc"))

"""Loads the Avro schemas: one per entity and version, each the full event record.

They live in the project's `schemas/<entity>/v<N>.avsc`, or beside a service's models: a
package `MODELS` names may carry its own `schemas/` folder (`app/registry.py` adds it to the
search path), so a service's entities need no file in this repository.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import fastavro

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"  # schemas/ beside app/
#: Schema folders of the models' packages, searched after `SCHEMA_DIR` (`add_schema_dir`).
EXTRA_DIRS: list[Path] = []


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


def add_schema_dir(directory: Path) -> None:
    """Search `directory` for schemas too (after the project's `schemas/`)."""
    if directory not in EXTRA_DIRS:
        EXTRA_DIRS.append(directory)


def schema_dirs() -> list[Path]:
    """Where schemas are looked for, in order."""
    return [SCHEMA_DIR, *EXTRA_DIRS]


def schema_path(entity: str, version: int) -> Path:
    """The file of `<entity>` at `version`: the first `<dir>/<entity>/v<version>.avsc` that exists
    (the project's when none does, for the error to name)."""
    for directory in schema_dirs():
        path = directory / entity / f"v{version}.avsc"
        if path.exists():
            return path
    return SCHEMA_DIR / entity / f"v{version}.avsc"


@cache
def load(entity: str, version: int) -> EventSchema:
    """The schema of `<entity>` at `version`, from `<schema dir>/<entity>/v<version>.avsc`."""
    path = schema_path(entity, version)
    if not path.exists():
        where = " or ".join(str(d / entity / f"v{version}.avsc") for d in schema_dirs())
        raise LookupError(f"no schema for {entity} v{version}: {where} does not exist")
    raw = json.loads(path.read_text())
    return EventSchema(entity, version, path, raw, fastavro.parse_schema(raw))


def versions(entity: str) -> list[int]:
    """Every version of `entity` that has a schema file, ascending."""
    return sorted({int(p.stem[1:]) for d in schema_dirs() for p in (d / entity).glob("v*.avsc")})

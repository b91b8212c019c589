"""Model and schema agree: every column an event should carry is a field of the entity's `.avsc`.

An entity's event state is built from the fields of its Avro schema (`plans.state_sql`), so
a column the schema lacks would be dropped from every event without a word; a sensitive column
in the schema would fail at `init-db` or the first write; a schema field with neither a column
nor a default could never be filled. `schemas check`, `init-db`, the relay and the worker run
this check before anything else and refuse with one line naming the model, the column and the
file.

A column stays out of events on purpose in one of two ways:
- `sensitive_column(...)`: its owner's alone (no other role may read it, `roles.py`);
- `unevented_column(...)`: an internal detail (a lock version, a denormalised search column)
  that other services may still read from the table but no consumer gets in an event.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import Column
from sqlalchemy.orm import mapped_column

from app.capture.model import EventedBase
from app.errors import EventsError
from app.wire import schemas as wire_schemas
from app.wire.schemas import field_type, non_null, record_fields

#: `Column.info` key of a column kept out of events on purpose (see `unevented_column`).
UNEVENTED = "unevented"
HOW_TO_EXCLUDE = "unevented_column() (kept out of events) or sensitive_column() (its owner's alone)"


class ModelSchemaMismatch(EventsError, ValueError):
    """A model and its entity's Avro schema disagree; raised before anything runs."""


def unevented_column(*args: Any, **kwargs: Any) -> Any:
    """`mapped_column` for a column kept out of the entity's events on purpose (not sensitive)."""
    info = dict(kwargs.pop("info", {}) or {})
    info[UNEVENTED] = True
    return mapped_column(*args, info=info, **kwargs)


def disagreements(base: type[EventedBase], schema_dir: Path | None = None) -> list[str]:
    """One line per disagreement between the models on `base` and their schemas: found on the
    search path (`app.wire.schemas.schema_path`), or in `schema_dir` when given. In a directory
    other than the project's, only the entities it has a folder for are checked (`schemas check
    --dir` on a partial copy)."""
    partial = schema_dir is not None and schema_dir.resolve() != wire_schemas.SCHEMA_DIR.resolve()
    out: list[str] = []
    for mapper in sorted(base.registry.mappers, key=lambda m: m.class_.__name__):
        model = mapper.class_
        root = model.__extends__ or model
        if schema_dir is None:  # the search path: the project's, then the models' packages'
            path = wire_schemas.schema_path(root.__entity__, root.__schema_version__)
        else:
            if partial and not (schema_dir / root.__entity__).is_dir():
                continue
            path = schema_dir / root.__entity__ / f"v{root.__schema_version__}.avsc"
        shown = _shown(path, path.parents[1])
        try:
            raw = json.loads(path.read_text())
            fields = record_fields(field_type(raw, "data"))
        except FileNotFoundError:
            out.append(f"{model.__name__}: {shown} does not exist (entity {root.__entity__!r}, "
                       f"__schema_version__ {root.__schema_version__}): add the schema")
            continue
        except (ValueError, KeyError, TypeError) as exc:
            out.append(f"{model.__name__}: {shown} has no readable `data` record ({type(exc).__name__}: {exc})")
            continue
        out += _model_problems(model, root, fields, shown)
        if model.__extends__ is None:
            out += _aggregation_problems(model, fields, shown)
    return out + _table_name_clashes(base)


def check_models(base: type[EventedBase], schema_dir: Path | None = None) -> None:
    """Raise `ModelSchemaMismatch` (one line: the first disagreement) if there is any."""
    problems = disagreements(base, schema_dir)
    if problems:
        more = f" (and {len(problems) - 1} more: `python -m app schemas check` lists them)" if len(problems) > 1 else ""
        raise ModelSchemaMismatch(problems[0] + more)


def _model_problems(model: Any, root: Any, fields: list[dict[str, Any]], shown: str) -> list[str]:
    table = model.__table__
    if model.__extends__ is not None:
        ext = model.__extension_field__
        record = next((f for f in fields if f["name"] == ext), None)
        if record is None:
            return [f"{model.__name__}: its extension field {ext!r} is not a field of the data record in {shown}"]
        fields = record_fields(non_null(record["type"]))
        where = f"the {ext!r} record in {shown}"
        # The extension's key is its root's: the event is keyed by it, not carried twice.
        implied = {c.name for c in table.columns if _references(c, root)}
        nested = set()
    else:
        where = f"the data record in {shown}"
        implied = set()
        nested = {m.class_.__extension_field__ for m in root.registry.mappers
                  if getattr(m.class_, "__extends__", None) is root}
    by_name = {f["name"]: f for f in fields}
    attrs = {prop.columns[0].name: prop.key for prop in model.__mapper__.column_attrs}
    out = []
    for column in table.columns:
        if column.name in implied:
            continue
        name = f"{model.__name__}.{attrs.get(column.name, column.name)}"
        in_schema = column.name in by_name
        if column.info.get("sensitive"):
            if in_schema:
                out.append(f"{name} is sensitive but is field {column.name!r} of {where}: remove it from the "
                           "schema (sensitive data never enters events)")
        elif column.info.get(UNEVENTED):
            if in_schema:
                out.append(f"{name} is declared unevented_column() but is field {column.name!r} of {where}: "
                           "remove one or the other")
        elif not in_schema:
            out.append(f"{name} (column {table.name}.{column.name}) is not a field of {where}, so every event "
                       f"would drop it: add the field, or declare the column with {HOW_TO_EXCLUDE}")
    for field in fields:
        if field["name"] in table.columns or field["name"] in nested or "default" in field:
            continue
        out.append(f"{model.__name__}: field {field['name']!r} of {where} has no column in table {table.name} "
                   "and no default, so no event could fill it: add the column, or give the field a default")
    return out


def _aggregation_problems(model: Any, fields: list[dict[str, Any]], shown: str) -> list[str]:
    """The model's `__aggregations__` that name what its schema cannot give."""
    out = [f"{model.__name__}: {problem} in {shown}"
           for declared in getattr(model, "__aggregations__", ()) for problem in declared.problems(fields)]
    times = sorted({declared.time for declared in getattr(model, "__aggregations__", ()) if declared.time is not None})
    if len(times) > 1:
        out.append(f"{model.__name__}: its window_count aggregations use different time fields {times}: "
                   "an entity's windows must share one")
    return out


def _table_name_clashes(base: type[EventedBase]) -> list[str]:
    """Aggregations named like an entity or like each other: the worker has one table per name."""
    roots = [m.class_ for m in base.registry.mappers if getattr(m.class_, "__extends__", None) is None]
    owners: dict[str, str] = {model.__entity__: f"entity {model.__entity__!r}" for model in roots}
    out = []
    for model in sorted(roots, key=lambda m: m.__name__):
        for declared in getattr(model, "__aggregations__", ()):
            if declared.name in owners:
                out.append(f"{model.__name__}: aggregation {declared.name!r} has the name of {owners[declared.name]}, "
                           "and the worker keeps one table per name: rename it")
            owners.setdefault(declared.name, f"an aggregation of {model.__name__}")
    return out


def _references(column: Column[Any], root: Any) -> bool:
    """Whether `column` is a foreign key to `root`'s primary key."""
    keys = set(root.__table__.primary_key.columns)
    return any(fk.column in keys for fk in column.foreign_keys)


def _shown(path: Path, directory: Path) -> str:
    """`path` as a user finds it: relative to the directory above the schemas when it can be."""
    try:
        return str(path.relative_to(directory.parent))
    except ValueError:
        return str(path)

"""Per-model plans: how a model maps to its aggregate and its Avro schema, how a write is checked
against it, and the SQL that reads an aggregate's state as its events carry it (`state_sql`:
the capture trigger, the snapshot and the cache's read on a miss all use it).
"""
from __future__ import annotations

import re
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Column, DateTime, Table, inspect
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import ClauseElement

from app.capture.model import EventedBase
from app.errors import EventsError
from app.wire.schemas import EventSchema, load, non_null, record_fields

LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


class SchemaMismatch(EventsError, ValueError):
    """A write whose data does not fit the entity's Avro schema; raised before anything is sent."""

    def __init__(self, entity: str, field: str, version: int, problem: str) -> None:
        super().__init__(f"{entity}: field {field!r} does not fit schema v{version}: {problem}")
        self.entity, self.field, self.version, self.problem = entity, field, version, problem


class EntityPlan:
    """What the event capture needs to know about one model, computed once per model."""

    def __init__(self, model: type[EventedBase]) -> None:
        root = model.__extends__ or model
        self.model = model
        self.root: type[EventedBase] = root
        self.is_root = model.__extends__ is None
        self.root_entity: str = root.__entity__
        self.version: int = root.__schema_version__
        self.schema: EventSchema = load(self.root_entity, self.version)
        self.table: Table = model.__table__  # type: ignore[assignment]  # a FromClause to the stubs; every evented model maps a Table
        root_pk = _single_pk(root)
        if self.is_root:
            self.key_column: Column[Any] = root_pk
            self.parent_attr: str | None = None
            self.fields = self.schema.data_fields()
            self.path = ""
        else:
            self.key_column = next(
                c for c in self.table.columns
                if any(fk.column is root_pk for fk in c.foreign_keys)
            )
            self.parent_attr = next(
                (r.key for r in inspect(model).relationships if r.mapper.class_ is root), None
            )
            ext_field = model.__extension_field__ or ""
            self.fields = record_fields(non_null(_field(self.schema.data_fields(), ext_field)["type"]))
            self.path = ext_field + "."
        self._key_attr = inspect(model).get_property_by_column(self.key_column).key
        self._checked = _checked_columns(model, self.fields)

    @property
    def key_sql_type(self) -> str:
        """The PostgreSQL type of the aggregate key, for a `CAST` of its text form."""
        return str(self.key_column.type.compile(dialect=_pg_dialect()))

    def key_of(self, obj: EventedBase) -> Any:
        """The aggregate key of `obj`: its primary key, or its root's for an extension."""
        return getattr(obj, self._key_attr)

    def validate(self, obj: EventedBase) -> None:
        """Raise SchemaMismatch if a set attribute of `obj` cannot be encoded in the schema."""
        state = obj.__dict__
        for attr, avro_type, nullable_by_default in self._checked:
            if attr not in state:
                continue
            value = state[attr]
            if isinstance(value, ClauseElement):
                continue  # a SQL expression (`amount + 1`): computed by the database, read back
            if value is None and nullable_by_default:
                continue  # filled by a column default/server default at INSERT
            problem = type_problem(value, avro_type)
            if problem:
                raise SchemaMismatch(self.root_entity, self.path + attr, self.version, problem)


def _single_pk(model: type[EventedBase]) -> Column[Any]:
    pk = inspect(model).primary_key
    if len(pk) != 1:
        raise TypeError(f"{model.__name__}: evented entities need a single-column primary key")
    return pk[0]  # type: ignore[return-value]  # a mapped primary key is a Column


def _field(fields: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for f in fields:
        if f["name"] == name:
            return f
    raise LookupError(f"schema has no field {name!r}")


def _checked_columns(model: type[EventedBase], fields: list[dict[str, Any]]) -> list[tuple[str, Any, bool]]:
    """(attribute, Avro type, may be None before INSERT) for every column that is in the schema."""
    mapper = inspect(model)
    out = []
    for f in fields:
        col = mapper.columns.get(f["name"])
        if col is None:
            continue
        if col.info.get("sensitive"):
            raise TypeError(f"{model.__name__}.{f['name']} is sensitive but appears in its Avro schema")
        has_default = col.default is not None or col.server_default is not None or col.autoincrement is True
        out.append((mapper.get_property_by_column(col).key, f["type"], has_default or col.primary_key))
    return out


def type_problem(value: Any, avro_type: Any) -> str | None:
    """Why `value` cannot be written as `avro_type`, or None if it can."""
    if isinstance(avro_type, list):
        if value is None and "null" in avro_type:
            return None
        problems = [type_problem(value, t) for t in avro_type if t != "null"]
        return None if any(p is None for p in problems) else (problems[0] if problems else "must be null")
    if value is None:
        return "must not be null"
    if isinstance(avro_type, dict):
        kind = avro_type.get("logicalType") or avro_type["type"]
        if kind in ("timestamp-micros", "timestamp-millis"):
            return None if isinstance(value, (datetime, int)) and not isinstance(value, bool) else (
                f"expected a datetime, got {type(value).__name__} {value!r:.80}")
        if kind == "enum":
            return None if value in avro_type["symbols"] else (
                f"{value!r:.80} is not one of {avro_type['symbols']}")
        if kind == "uuid":
            return None if isinstance(value, str) else f"expected a UUID string, got {value!r:.80}"
        return type_problem(value, avro_type["type"])
    if avro_type in ("long", "int"):
        low, high = (LONG_MIN, LONG_MAX) if avro_type == "long" else (INT_MIN, INT_MAX)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"expected an integer ({avro_type}), got {type(value).__name__} {value!r:.80}"
        return None if low <= value <= high else f"{value} is out of range for Avro {avro_type}"
    if avro_type == "string":
        return None if isinstance(value, str) else f"expected a string, got {type(value).__name__} {value!r:.80}"
    if avro_type in ("double", "float"):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else (
            f"expected a number, got {value!r:.80}")
    if avro_type == "boolean":
        return None if isinstance(value, bool) else f"expected a boolean, got {value!r:.80}"
    return None


@cache
def plan_for(model: type[EventedBase]) -> EntityPlan:
    """The plan of `model`, built on first use."""
    return EntityPlan(model)


def _value_sql(alias: str, column: Column[Any]) -> str:
    """SQL for one column's value in the event's JSON: timestamps as epoch microseconds."""
    ref = f'{alias}."{column.name}"'
    if isinstance(column.type, DateTime):
        return f"(extract(epoch from {ref}) * 1000000)::bigint"
    return ref


def _object_sql(alias: str, model: type[EventedBase], fields: list[dict[str, Any]]) -> list[str]:
    """`'name', value` pairs for json_build_object, for the schema fields that are columns."""
    cols = inspect(model).columns
    return [f"'{f['name']}', {_value_sql(alias, cols[f['name']])}" for f in fields if f["name"] in cols]


@cache
def state_sql(root: type[EventedBase], key: str = "ev.key") -> str:
    """A scalar subquery giving the JSON state of the aggregate whose key (as text) is `key`."""
    plan = plan_for(root)
    parts = _object_sql("r", root, plan.fields)
    for ext in extensions_of(root):
        ep = plan_for(ext)
        inner = ", ".join(_object_sql("e", ext, ep.fields))
        parts.append(
            f"'{ext.__extension_field__}', (SELECT json_build_object({inner}) "
            f'FROM "{ep.table.name}" e WHERE e."{ep.key_column.name}" = r."{plan.key_column.name}")'
        )
    return (
        f"(SELECT json_build_object({', '.join(parts)}) FROM \"{plan.table.name}\" r "
        f"WHERE r.\"{plan.key_column.name}\" = CAST({key} AS {plan.key_sql_type}))"
    )


def extensions_of(root: type[EventedBase]) -> list[type[EventedBase]]:
    """The models that extend `root`."""
    return [m.class_ for m in root.registry.mappers if getattr(m.class_, "__extends__", None) is root]


@cache
def _pg_dialect() -> Any:
    return postgresql.dialect()


def sql_identifier(name: str) -> str:
    """A table or column name defined in code, checked before it goes into DDL."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"unexpected characters in name {name!r}")
    return name


def sql_literal(value: str) -> str:
    """A SQL string literal of a name defined in code (entity, topic)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"unexpected characters in {value!r}")
    return f"'{value}'"

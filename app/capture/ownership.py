"""Service ownership: only an entity's owner writes it or reads its sensitive columns.

Sensitive columns are deferred for everyone. For the owner, ORM selects of the entity get
`undefer()` added, so the owner sees no difference. For any other service:
- writes of the entity (flush or bulk statement) raise `OwnershipError`;
- SQL that names a sensitive column of a table it does not own — `select(Customer.email)`,
  `undefer()`, bulk statements, raw `text()` through its sessions — is refused by an engine
  hook before it reaches the database (a last line that covers every way of writing SQL);
- reading the attribute of an instance it loaded raises `OwnershipError` instead of loading.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import InstrumentedAttribute, mapped_column, undefer

from app.capture.model import EventedBase
from app.errors import EventsError

#: Key under which `_on_load` notes, in an instance's __dict__, which service loaded it.
LOADED_BY = "_evented_loaded_by"


class OwnershipError(EventsError, PermissionError):
    """A service touched data only its owner may touch; names entity, column and owner."""

    def __init__(self, entity: str, column: str, owner: str, service: str, action: str) -> None:
        super().__init__(
            f"service {service!r} may not {action} {entity}.{column}: owned by service {owner!r} "
            f"(ask {owner!r} over HTTP)")
        self.entity, self.column, self.owner, self.service = entity, column, owner, service


def sensitive_column(*args: Any, readers: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """`mapped_column` for a sensitive column: deferred, marked, never in events or caches.

    `readers`: the services that may read it from its owner over HTTP (`app/web/owner.py`;
    `FIELD_READERS` overrides it).
    """
    info = dict(kwargs.pop("info", {}) or {})
    info["sensitive"] = True
    info["readers"] = tuple(readers)
    return mapped_column(*args, deferred=True, info=info, **kwargs)


@dataclass(frozen=True)
class Sensitive:
    """One sensitive column and who owns it."""

    model: type
    entity: str
    table: str
    column: str
    attr: str
    owner: str

    @property
    def pattern(self) -> re.Pattern[str]:
        """Matches normalized SQL naming this column of this table, or all of its columns at once."""
        table, column = re.escape(self.table.lower()), re.escape(self.column.lower())
        return re.compile(rf'(?s)\b{table}\b.*(?:\b{column}\b|{_WHOLE_ROW})'
                          rf'|(?:\b{column}\b|{_WHOLE_ROW}).*\b{table}\b')


#: SQL forms that read every column of a row without naming one: `SELECT *`, `t.*`, a row
#: turned into JSON, XML or text. (The database's column privileges refuse them anyway; this
#: is the early, named error. `count(*)` is not one of them.)
_WHOLE_ROW = (r"(?:\bselect\s+(?:distinct\s+)?\*|,\s*\*|\.\*|\brow_to_json\b|\bto_jsonb?\b"
              r"|\bjsonb?_agg\b|\bjsonb?_populate|\b(?:query|table|cursor)_to_xml|\brow\s*\()")
_UNICODE_IDENT = re.compile(r'(?i)u&"((?:[^"]|"")*)"')
_UNICODE_ESCAPE = re.compile(r"\\(?:\+([0-9a-fA-F]{6})|([0-9a-fA-F]{4}))")


def normalize_sql(sql: str) -> str:
    """SQL with identifiers compared as PostgreSQL does: `U&"\\0065mail"` decoded, quotes
    dropped, case folded. (Folding quoted upper-case names too only errs towards refusing.)"""
    def decode(match: re.Match[str]) -> str:
        return _UNICODE_ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), match.group(1))

    return _UNICODE_IDENT.sub(decode, sql).replace('"', "").lower()


def owner_of(model: type[EventedBase]) -> str:
    """The owner service of a model (an extension is owned by its root's owner)."""
    root = model.__extends__ or model
    return root.__owner__


def sensitive_columns(base: type[EventedBase]) -> list[Sensitive]:
    """Every sensitive column of every evented model."""
    out = []
    for mapper in base.registry.mappers:
        model = mapper.class_
        for prop in mapper.column_attrs:
            col = prop.columns[0]
            if col.info.get("sensitive"):
                if not prop.deferred:
                    raise TypeError(f"{model.__name__}.{prop.key} is sensitive: declare it with "
                                    "sensitive_column() so it is deferred")
                root = model.__extends__ or model
                out.append(Sensitive(model, root.__entity__, model.__tablename__, col.name, prop.key,
                                     owner_of(model)))
    return out


class SensitiveAttribute(InstrumentedAttribute[Any]):
    """An instrumented attribute that refuses to read for a service that does not own it."""

    __slots__ = ()

    def __get__(self, instance: object | None, owner: Any) -> Any:
        if instance is not None:
            reader = instance.__dict__.get(LOADED_BY)
            guarded = _GUARDED.get(id(self))
            if reader is not None and guarded is not None and reader != guarded.owner:
                raise OwnershipError(guarded.entity, guarded.column, guarded.owner, reader, "read")
        return super().__get__(instance, owner)


_GUARDED: dict[int, Sensitive] = {}


def guard_attributes(base: type[EventedBase]) -> None:
    """Make every sensitive attribute a `SensitiveAttribute` (idempotent)."""
    for item in sensitive_columns(base):
        attr = getattr(item.model, item.attr)
        if type(attr) is InstrumentedAttribute:
            attr.__class__ = SensitiveAttribute
        _GUARDED[id(attr)] = item


@cache
def foreign_sensitive(base: type[EventedBase], service: str) -> tuple[Sensitive, ...]:
    """Sensitive columns `service` does not own."""
    return tuple(s for s in sensitive_columns(base) if s.owner != service)


@cache
def owned_undefers(base: type[EventedBase], service: str) -> dict[type, list[Any]]:
    """model -> `undefer()` options of the sensitive columns `service` owns on it."""
    out: dict[type, list[Any]] = {}
    for s in sensitive_columns(base):
        if s.owner == service:
            out.setdefault(s.model, []).append(undefer(getattr(s.model, s.attr)))
    return out


def check_sql(service: str, foreign: tuple[Sensitive, ...], sql: str) -> None:
    """Refuse SQL naming a sensitive column `service` does not own, or reading its whole row."""
    found = _foreign_in_sql(service, foreign, sql)
    if found is not None:
        raise OwnershipError(found.entity, found.column, found.owner, service, "read or write")


@lru_cache(maxsize=4096)  # statements repeat: the ORM renders the same text each time
def _foreign_in_sql(service: str, foreign: tuple[Sensitive, ...], sql: str) -> Sensitive | None:
    normalized = normalize_sql(sql)
    for item in foreign:
        if item.table.lower() in normalized and item.pattern.search(normalized):
            return item
    return None


class UneventedWrite(EventsError, PermissionError):
    """A write to an entity table outside the ORM (raw SQL, Core, DDL).

    The capture triggers would still raise its event (DDL such as TRUNCATE fires none), but
    the values would skip the schema check: a value the Avro schema cannot carry would fail
    at the relay, after commit, instead of here."""

    def __init__(self, table: str, service: str) -> None:
        super().__init__(
            f"service {service!r} may not write table {table!r} with raw SQL, Core statements or "
            "DDL: its values would skip the schema check (TRUNCATE would raise no event at all), "
            "so a bad value fails after commit instead of before. Write it through the ORM "
            "(session.add / delete, or ORM-enabled insert()/update()/delete() of the mapped "
            "class) so it is checked before any SQL is sent")
        self.table, self.service = table, service


@lru_cache(maxsize=64)
def _write_pattern(tables: frozenset[str]) -> re.Pattern[str]:
    names = "|".join(re.escape(t.lower()) for t in sorted(tables))
    target = rf"(?:only\s+)?(?:public\s*\.\s*)?({names})\b"
    return re.compile(rf"\b(?:insert\s+into|update|delete\s+from|merge\s+into|truncate(?:\s+table)?)"
                      rf"\s+{target}|\bcopy\s+{target}(?:\s*\([^)]*\))?\s+from\b")


@lru_cache(maxsize=4096)
def written_table(tables: frozenset[str], sql: str) -> str | None:
    """The entity table `sql` writes (INSERT/UPDATE/DELETE/MERGE/TRUNCATE/COPY FROM), if any."""
    normalized = normalize_sql(sql)
    if not any(t.lower() in normalized for t in tables):
        return None
    match = _write_pattern(tables).search(normalized)
    return match.group(1) or match.group(2) if match else None


def check_write(service: str, model: type[EventedBase]) -> None:
    """Refuse a write of an entity `service` does not own."""
    owner = owner_of(model)
    if owner != service:
        root = model.__extends__ or model
        raise OwnershipError(root.__entity__, "*", owner, service, "write")


def entity_models(statement: Any) -> list[type]:
    """The mapped classes a select returns as whole entities."""
    out = []
    for desc in getattr(statement, "column_descriptions", ()):
        entity = desc.get("entity")
        if entity is not None and desc.get("expr") is entity and inspect(entity, raiseerr=False) is not None:
            out.append(entity)
    return out

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
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.orm import InstrumentedAttribute, mapped_column, undefer

if TYPE_CHECKING:
    from app.orm import EventedBase

#: Key under which `_on_load` notes, in an instance's __dict__, which service loaded it.
LOADED_BY = "_evented_loaded_by"


class OwnershipError(PermissionError):
    """A service touched data only its owner may touch; names entity, column and owner."""

    def __init__(self, entity: str, column: str, owner: str, service: str, action: str) -> None:
        super().__init__(
            f"service {service!r} may not {action} {entity}.{column}: owned by service {owner!r} "
            f"(ask {owner!r} over HTTP)")
        self.entity, self.column, self.owner, self.service = entity, column, owner, service


def sensitive_column(*args: Any, **kwargs: Any) -> Any:
    """`mapped_column` for a sensitive column: deferred, marked, never in events or caches."""
    info = dict(kwargs.pop("info", {}) or {})
    info["sensitive"] = True
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
        """Matches SQL that names this column of this table (quoted or not, any order)."""
        return re.compile(rf'(?is)\b{re.escape(self.table)}\b.*\b{re.escape(self.column)}\b'
                          rf'|\b{re.escape(self.column)}\b.*\b{re.escape(self.table)}\b')


def owner_of(model: type["EventedBase"]) -> str:
    """The owner service of a model (an extension is owned by its root's owner)."""
    root = model.__extends__ or model
    return root.__owner__


def sensitive_columns(base: type["EventedBase"]) -> list[Sensitive]:
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
                out.append(Sensitive(model, root.__entity__, col.table.name, col.name, prop.key,
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


def guard_attributes(base: type["EventedBase"]) -> None:
    """Make every sensitive attribute a `SensitiveAttribute` (idempotent)."""
    for item in sensitive_columns(base):
        attr = getattr(item.model, item.attr)
        if type(attr) is InstrumentedAttribute:
            attr.__class__ = SensitiveAttribute
        _GUARDED[id(attr)] = item


@cache
def foreign_sensitive(base: type["EventedBase"], service: str) -> tuple[Sensitive, ...]:
    """Sensitive columns `service` does not own."""
    return tuple(s for s in sensitive_columns(base) if s.owner != service)


@cache
def owned_undefers(base: type["EventedBase"], service: str) -> dict[type, list[Any]]:
    """model -> `undefer()` options of the sensitive columns `service` owns on it."""
    out: dict[type, list[Any]] = {}
    for s in sensitive_columns(base):
        if s.owner == service:
            out.setdefault(s.model, []).append(undefer(getattr(s.model, s.attr)))
    return out


def check_sql(service: str, foreign: tuple[Sensitive, ...], sql: str) -> None:
    """Refuse SQL naming a sensitive column `service` does not own."""
    for item in foreign:
        if item.column in sql and item.pattern.search(sql):
            raise OwnershipError(item.entity, item.column, item.owner, service, "read or write")


def check_write(service: str, model: type["EventedBase"]) -> None:
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

"""EventedBase: the declarative base every entity model derives from, and what a model declares.

Nothing here acts: the listeners that make writes raise events are in `listeners.py`, the
plans that validate them in `plans.py`, the capture triggers in `app/outbox/store.py`. This
module imports none of them, so every one of them can import the base.
"""
from __future__ import annotations

from typing import ClassVar

from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase

from app.aggregations import Declared


class EventedBase(AsyncAttrs, DeclarativeBase):
    """Base of every entity model; its writes and reads raise events.

    Class attributes a model sets:
    - `__entity__`: topic family (`orders` -> `orders-v2`); `__owner__`: owner service;
      `__schema_version__`: current schema version; `__legacy__`: older version -> how it is
      served (`"dual-publish"` or `"downconvert"`); `__aggregations__`: the tables the worker
      derives from the entity's events (`app/aggregations.py`: `count_by`, `sum_by`, `window_count`);
    - for an extension instead: `__extends__` (the root model) and `__extension_field__`
      (the field of the root's data record holding it). Its events are raised as the root.
    """

    __entity__: ClassVar[str]
    __owner__: ClassVar[str]
    __schema_version__: ClassVar[int]
    __legacy__: ClassVar[dict[int, str]] = {}
    __aggregations__: ClassVar[tuple[Declared, ...]] = ()
    __extends__: ClassVar[type["EventedBase"] | None] = None
    __extension_field__: ClassVar[str | None] = None


def root_models() -> list[type[EventedBase]]:
    """The models that raise events under their own entity (not extensions)."""
    return [m.class_ for m in EventedBase.registry.mappers if m.class_.__extends__ is None]

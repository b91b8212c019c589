"""The session listeners: every write of an entity table leaves an outbox row in its transaction.

How a write becomes an event:
- `before_flush` (and `do_orm_execute` for ORM bulk `insert()/update()/delete()`) checks
  ownership and validates new and changed objects against the entity's Avro schema, so a bad
  write fails before any SQL is sent;
- PostgreSQL does the rest: a deferred capture trigger on every entity table
  (`app.outbox.store.capture_sql`, installed by `init-db`) bumps the aggregate's
  sequence under its row lock and writes one outbox row per aggregate per transaction, with
  the aggregate's state as committed, at COMMIT, in no round trip of the writer's own;
- the relay (`app.outbox.relay.Relay`) publishes committed rows. Rollback discards the rows with
  everything else, so a rolled-back transaction never publishes.
"""
from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Result
from sqlalchemy.orm import (
    Mapper,
    ORMExecuteState,
    Session,
    UOWTransaction,
)

from app.capture import ownership
from app.capture.access import AccessLog
from app.capture.model import EventedBase
from app.capture.plans import plan_for

log = logging.getLogger(__name__)

#: True while the ORM writes (a flush, an ORM bulk statement), whose values were checked
#: against the schema: `Database` refuses entity-table writes outside it (`UneventedWrite`).
#: Set and read in the same greenlet (SQLAlchemy runs the sync flush, and the cursor hooks,
#: in one).
CAPTURING: ContextVar[bool] = ContextVar("evented_capturing", default=False)


class EventedSession(Session):
    """The sync session behind every `Database.session()`; the event listeners attach here."""

    def flush(self, objects: Any = None) -> None:
        """Flush, marking its statements as the capture path's own."""
        token = CAPTURING.set(True)
        try:
            super().flush(objects)
        finally:
            CAPTURING.reset(token)


def _before_flush(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    """Check ownership and validate new and changed entities, before any SQL is sent.

    The events themselves are written by the capture triggers at COMMIT (`capture_sql`).
    """
    service = session.info["service"]
    for obj in (*session.new, *session.dirty, *session.deleted):
        if isinstance(obj, EventedBase):
            ownership.check_write(service, type(obj))
    for obj in session.new:
        if isinstance(obj, EventedBase):
            plan_for(type(obj)).validate(obj)
    for obj in session.dirty:
        if isinstance(obj, EventedBase) and session.is_modified(obj, include_collections=False):
            plan_for(type(obj)).validate(obj)


def _do_orm_execute(state: ORMExecuteState) -> Result[Any] | None:
    """ORM bulk insert/update/delete: check ownership, then run it as the capture path's own.

    Selects of entities with sensitive columns the session's service owns get them undeferred.
    """
    service = state.session.info["service"]
    if state.is_select:
        owned = ownership.owned_undefers(EventedBase, service)
        if owned:
            options = [o for m in ownership.entity_models(state.statement) for o in owned.get(m, ())]
            if options:
                state.statement = state.statement.options(*options)
        return None
    if not (state.is_insert or state.is_update or state.is_delete):
        return None
    mapper: Mapper[Any] | None = state.bind_mapper
    if mapper is None or not issubclass(mapper.class_, EventedBase):
        return None  # Core statements of entity tables are refused at the cursor: unchecked values
    ownership.check_write(service, mapper.class_)
    token = CAPTURING.set(True)
    try:
        return state.invoke_statement()
    finally:
        CAPTURING.reset(token)


def _on_load(target: EventedBase, context: Any) -> None:
    """Every entity loaded from a row is a read: note who loaded it and buffer it for the access log."""
    if context is None:
        # `session.merge(obj, load=False)` builds the instance from `obj`, not from a row:
        # nothing was read from the database.
        return
    target.__dict__[ownership.LOADED_BY] = context.session.info["service"]
    access: AccessLog | None = context.session.info.get("access")
    if access is not None:
        plan = plan_for(type(target))
        access.add(plan.root_entity, plan.key_of(target), context.session.info.get("on_behalf_of"))


_installed = False


def install_listeners() -> None:
    """Attach the event capture to `EventedSession` and `EventedBase`; idempotent."""
    global _installed
    if _installed:
        return
    event.listen(EventedSession, "before_flush", _before_flush)
    event.listen(EventedSession, "do_orm_execute", _do_orm_execute)
    event.listen(EventedBase, "load", _on_load, propagate=True)
    _installed = True

"""EventedBase and Database: every write of an entity table leaves an outbox row in its transaction.

How a write becomes an event:
- `before_flush` (and `do_orm_execute` for ORM bulk `insert()/update()/delete()`) checks
  ownership and validates new and changed objects against the entity's Avro schema, so a bad
  write fails before any SQL is sent;
- PostgreSQL does the rest: a deferred capture trigger on every entity table
  (`app.entities.capture_sql`, installed by `Database.create_all`) bumps the aggregate's
  sequence under its row lock and writes one outbox row per aggregate per transaction, with
  the aggregate's state as committed, at COMMIT, in no round trip of the writer's own;
- the relay (`app.relay.Relay`) publishes committed rows. Rollback discards the rows with
  everything else, so a rolled-back transaction never publishes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import Connection, event
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapper,
    ORMExecuteState,
    Session,
    UOWTransaction,
    configure_mappers,
)

from app import outbox, ownership
from app.entities import SchemaMismatch, capture_sql, plan_for
from app.ownership import OwnershipError, sensitive_column

log = logging.getLogger(__name__)

__all__ = ["EventedBase", "Database", "EventedSession", "OwnershipError", "SchemaMismatch",
           "sensitive_column"]


class EventedBase(AsyncAttrs, DeclarativeBase):
    """Base of every entity model; its writes and reads raise events.

    Class attributes a model sets:
    - `__entity__`: topic family (`orders` -> `orders-v2`); `__owner__`: owner service;
      `__schema_version__`: current schema version; `__legacy__`: older version -> how it is
      served (`"dual-publish"` or `"downconvert"`);
    - for an extension instead: `__extends__` (the root model) and `__extension_field__`
      (the field of the root's data record holding it). Its events are raised as the root.
    """

    __entity__: ClassVar[str]
    __owner__: ClassVar[str]
    __schema_version__: ClassVar[int]
    __legacy__: ClassVar[dict[int, str]] = {}
    __extends__: ClassVar[type["EventedBase"] | None] = None
    __extension_field__: ClassVar[str | None] = None


#: True while the ORM writes (a flush, an ORM bulk statement), whose values were checked
#: against the schema: `Database` refuses entity-table writes outside it (`UneventedWrite`).
#: Set and read in the same greenlet (SQLAlchemy runs the sync flush, and the cursor hooks,
#: in one).
_CAPTURING: ContextVar[bool] = ContextVar("evented_capturing", default=False)


class EventedSession(Session):
    """The sync session behind every `Database.session()`; the event listeners attach here."""

    def flush(self, objects: Any = None) -> None:
        """Flush, marking its statements as the capture path's own."""
        token = _CAPTURING.set(True)
        try:
            super().flush(objects)
        finally:
            _CAPTURING.reset(token)


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
    token = _CAPTURING.set(True)
    try:
        return state.invoke_statement()
    finally:
        _CAPTURING.reset(token)


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


def root_models() -> list[type[EventedBase]]:
    """The models that raise events under their own entity (not extensions)."""
    return [m.class_ for m in EventedBase.registry.mappers if m.class_.__extends__ is None]


def install_capture(conn: Connection) -> None:
    """Create or replace the capture trigger of every entity table (`capture_sql`)."""
    for model in root_models():
        for statement in capture_sql(model):
            conn.exec_driver_sql(statement)


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


class AccessLog:
    """Buffers ORM reads and writes them as one access event per entity and interval.

    Reads are best-effort by design: they go through the outbox (so services need no Kafka
    client) but in a separate, batched transaction, never in the reader's own.
    """

    def __init__(self, db: "Database", interval: float, max_keys: int) -> None:
        self._db = db
        self._interval = interval
        self._max_keys = max_keys
        self._batches: dict[tuple[str, str | None], _AccessBatch] = {}
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self.dropped = 0

    def add(self, entity: str, key: Any, on_behalf_of: str | None = None) -> None:
        """Note one read of `entity` `key` (for a calling service, if any); cheap, no I/O."""
        batch = self._batches.get((entity, on_behalf_of))
        if batch is None:
            batch = self._batches[(entity, on_behalf_of)] = _AccessBatch(first_at=time.time())
        batch.keys.add(str(key))
        batch.reads += 1
        batch.last_at = time.time()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="access-log")
        if len(batch.keys) >= self._max_keys:
            self._wakeup.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._interval)
            self._wakeup.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write the buffered reads as access events now."""
        if not self._batches:
            return
        batches, self._batches = self._batches, {}
        try:
            async with self._db.engine.begin() as conn:
                await conn.run_sync(lambda c: outbox.record_access(
                    c, self._db.service, {k: b.as_data(k[1]) for k, b in batches.items()}))
        except Exception as exc:  # best-effort: a failed access batch must not break reads
            self.dropped += sum(b.reads for b in batches.values())
            log.warning("access events dropped: %s", exc)

    async def close(self) -> None:
        """Flush what is buffered and stop the background task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()


@dataclass
class _AccessBatch:
    first_at: float
    last_at: float = 0.0
    reads: int = 0
    keys: set[str] = field(default_factory=set)

    def as_data(self, on_behalf_of: str | None) -> dict[str, Any]:
        return {
            "first_at": datetime.fromtimestamp(self.first_at, timezone.utc),
            "last_at": int(self.last_at * 1_000_000),
            "reads": self.reads,
            "keys": sorted(self.keys),
            "on_behalf_of": on_behalf_of,
        }


def _sql_filter(service: str) -> Any:
    """A `before_cursor_execute` hook: early, named errors for SQL the roles would refuse or
    that would write an entity table without its event."""
    foreign = ownership.foreign_sensitive(EventedBase, service)
    models = {m.local_table.name: m.class_ for m in EventedBase.registry.mappers}
    tables = frozenset(models)

    def check(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
              executemany: bool) -> None:
        if _CAPTURING.get():
            return  # the flush or an ORM bulk statement: its events are being raised
        written = ownership.written_table(tables, statement)
        if written is not None:
            ownership.check_write(service, models[written])  # a non-owner's error names the owner
            raise ownership.UneventedWrite(written, service)
        if foreign and (context is None or not context.isddl):  # creating tables reads no data
            ownership.check_sql(service, foreign, statement)

    return check


class Database:
    """An async engine whose sessions raise events for every write and read."""

    def __init__(self, url: str, *, service: str = "orders", pool_size: int = 10,
                 access_interval: float = 0.25, access_max_keys: int = 5000,
                 record_reads: bool = True, sql_filter: bool = True) -> None:
        """`url` carries the credentials: connect as the service's own role (app/roles.py),
        whose privileges PostgreSQL enforces. `sql_filter=False` turns off the library's early
        checks of raw SQL (the tests prove the roles hold without them)."""
        install_listeners()
        self.service = service
        self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
        configure_mappers()
        ownership.guard_attributes(EventedBase)
        if sql_filter:
            # Every statement of this engine, however it was written, passes these checks.
            event.listen(self.engine.sync_engine, "before_cursor_execute", _sql_filter(service))
        self.access: AccessLog | None = (
            AccessLog(self, access_interval, access_max_keys) if record_reads else None
        )
        self._sessions = async_sessionmaker(
            self.engine, sync_session_class=EventedSession, expire_on_commit=False,
            info={"service": service, "access": self.access},
        )

    @contextlib.asynccontextmanager
    async def session(self, *, on_behalf_of: str | None = None) -> AsyncIterator[AsyncSession]:
        """A session in a transaction: committed when the block ends, rolled back on error.

        `on_behalf_of` names the service a request came from (an owner answering another
        service over HTTP), so its access events say who the data was read for.
        """
        async with self._sessions(info={"on_behalf_of": on_behalf_of}) as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    async def create_all(self) -> None:
        """Create the entity tables, the outbox and its triggers, and the capture triggers (idempotent)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(EventedBase.metadata.create_all)
            await conn.run_sync(outbox.install)
            await conn.run_sync(install_capture)

    async def close(self) -> None:
        """Flush the access log and close every pooled connection."""
        if self.access is not None:
            await self.access.close()
        await self.engine.dispose()

"""Database: the async engine a service writes through, with its early checks and access log."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import configure_mappers

from app.capture import ownership
from app.capture.access import FLUSH_INTERVAL, MAX_KEYS, AccessLog
from app.capture.listeners import CAPTURING, EventedSession, install_listeners
from app.capture.model import EventedBase


def _sql_filter(service: str) -> Any:
    """A `before_cursor_execute` hook: early, named errors for SQL the roles would refuse or
    that would write an entity table without its event."""
    foreign = ownership.foreign_sensitive(EventedBase, service)
    models = {m.class_.__tablename__: m.class_ for m in EventedBase.registry.mappers}
    tables = frozenset(models)

    def check(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
              executemany: bool) -> None:
        if CAPTURING.get():
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

    def __init__(self, url: str, *, service: str, pool_size: int = 10,
                 access_interval: float = FLUSH_INTERVAL, access_max_keys: int = MAX_KEYS,
                 record_reads: bool = True, sql_filter: bool = True) -> None:
        """`url` carries the credentials: connect as the service's own role (app/capture/roles.py),
        whose privileges PostgreSQL enforces. `service` names who writes and reads (ownership
        checks, access events): required, so a forgotten one cannot pass as another service.
        `sql_filter=False` turns off the library's early checks of raw SQL (the tests prove the
        roles hold without them)."""
        install_listeners()
        self.service = service
        self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
        configure_mappers()
        ownership.guard_attributes(EventedBase)
        if sql_filter:
            # Every statement of this engine, however it was written, passes these checks.
            event.listen(self.engine.sync_engine, "before_cursor_execute", _sql_filter(service))
        self.access: AccessLog | None = (
            AccessLog(self.engine, service, access_interval, access_max_keys) if record_reads else None
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

    async def close(self) -> None:
        """Flush the access log and close every pooled connection."""
        if self.access is not None:
            await self.access.close()
        await self.engine.dispose()

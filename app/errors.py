"""The library's one error family: `EventsError`, and whether an error is worth retrying.

Every error this code raises on purpose derives from `EventsError` (and keeps the built-in
base it had, so `except ValueError` callers still catch a schema mismatch). `transient` is on
the type, as aiokafka's `KafkaError.retriable`: True when the same operation may succeed later
unchanged (a server that does not answer), False when the input or the code is wrong and a
retry cannot help (refuse it, or dead-letter it). `is_transient` also classifies the errors of
the libraries underneath (asyncpg, SQLAlchemy, the network), which are not ours to subclass.
"""
from __future__ import annotations

import asyncio
from typing import ClassVar

#: SQLSTATE classes and codes that say "try again": connection exceptions (08), operator
#: intervention such as a restart (57P), insufficient resources (53), serialization
#: failures and deadlocks (40001, 40P01).
TRANSIENT_SQLSTATES = ("08", "57P", "53", "40001", "40P01")


class EventsError(Exception):
    """The base of this library's errors; `transient` says whether retrying may help."""

    transient: ClassVar[bool] = False


class StartupError(EventsError, RuntimeError):
    """A server a command or service needs is unreachable or not set up; the message names it
    and its address, in one line (app/cli/preflight.py checks them before anything runs)."""

    transient = True  # a server that does not answer yet may later


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says a server or the network is unavailable, so the
    same operation may succeed later, rather than that the input or the handler is wrong."""
    from aiokafka.errors import KafkaError
    from asyncpg import exceptions as pg
    from sqlalchemy.exc import DBAPIError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EventsError):
            return current.transient
        if isinstance(current, KafkaError) and current.retriable:  # the broker's own verdict
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, (OSError, ConnectionError, asyncio.TimeoutError,
                                pg.PostgresConnectionError, pg.InterfaceError)):
            return True
        state = getattr(current, "sqlstate", None) or getattr(getattr(current, "orig", None), "sqlstate", None)
        if isinstance(state, str) and state.startswith(TRANSIENT_SQLSTATES):
            return True
        current = current.__cause__ or getattr(current, "orig", None)
    return False

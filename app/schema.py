"""The whole database schema: the entity tables, the outbox, the inbox and the capture triggers.

`init-db` creates it as the tables' owner (app/cli/preflight.py), never as a service's role;
demos and benchmarks whose role may create tables call `create_all` on their engine.
"""
from __future__ import annotations

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.capture.model import EventedBase
from app.inbox import store as inbox
from app.outbox import store as outbox


def create_schema(conn: Connection) -> None:
    """Create the entity tables, the outbox and its triggers, the inbox, and the capture
    triggers (idempotent)."""
    EventedBase.metadata.create_all(conn)
    outbox.create_tables(conn)
    inbox.create_tables(conn)
    outbox.create_capture_triggers(conn)


async def create_all(engine: AsyncEngine) -> None:
    """`create_schema` on `engine`, in one transaction."""
    async with engine.begin() as conn:
        await conn.run_sync(create_schema)

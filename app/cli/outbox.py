"""`python -m app outbox status`: pending outbox rows and the age of the oldest."""
from __future__ import annotations

import asyncpg

from app.capture.roles import WORKER
from app.cli.preflight import check_database
from app.outbox.store import LAG_SQL
from app.settings import Settings


async def outbox_status(settings: Settings) -> None:
    """Print pending outbox rows and the age of the oldest."""
    await check_database(settings)
    # As the relay's role (DATABASE_URL_WORKER), the one that reads the outbox; else DATABASE_URL.
    conn = await asyncpg.connect(settings.asyncpg_dsn_for(WORKER))
    try:
        count, oldest = await conn.fetchrow(LAG_SQL)
    finally:
        await conn.close()
    print(f"pending rows: {count}\noldest: {float(oldest or 0):.3f} s")

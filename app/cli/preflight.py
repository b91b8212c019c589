"""What runs before a command starts: configuration and reachability checks, topic creation, init-db.

Every failure is one `StartupError` line naming the server and its address, not a traceback.
"""
from __future__ import annotations

import asyncio
import logging

from app.errors import StartupError
from app.settings import Settings

__all__ = ["StartupError", "check_all", "check_broker", "check_database", "check_models_agree", "create_topics",
           "init_db", "require"]


def require(settings: Settings, field: str, env: str) -> None:
    """Fail with one line when a URL the command needs is not configured."""
    if not getattr(settings, field):
        raise StartupError(f"{env} is not set (or use `python -m app dev`, which starts embedded servers)")


async def check_database(settings: Settings) -> None:
    """Connect once, so an unreachable database is one clear line instead of a traceback."""
    import asyncpg

    try:
        conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=5)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
        raise StartupError(f"cannot reach PostgreSQL at {_where(settings.database_url)}: {exc}") from None
    await conn.close()


async def check_broker(settings: Settings) -> None:
    """Fetch metadata once, so an unreachable broker is one clear line."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=5000)
    # aiokafka logs its own ERROR for each failed connection attempt; the StartupError below
    # says the same in one line, so its logger is quiet for the check.
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        await producer.start()
    except KafkaError as exc:
        raise StartupError(f"cannot reach the Kafka broker at {settings.kafka_broker}: {exc}") from None
    finally:
        await producer.stop()
        quiet.setLevel(level)


async def create_topics(settings: Settings) -> None:
    """Create the event topics (and dead-letter topics) the worker consumes and produces."""
    from app.kafka import ensure_topics
    from app.registry import load_models
    from app.topology import worker_topics

    load_models(settings)  # the entities whose topics are created
    await ensure_topics(settings, worker_topics(settings.app_id))


async def check_all(settings: Settings) -> None:
    """Check the database and the broker before starting anything that needs both."""
    await check_database(settings)
    await check_broker(settings)


def _where(url: str) -> str:
    """host:port/db of a database URL, without credentials."""
    return url.rsplit("@", 1)[-1]


def check_models_agree(settings: Settings) -> None:
    """Load the models `MODELS` names; they must agree with their Avro schemas
    (`app.capture.agreement`), else one line."""
    from app.capture.agreement import ModelSchemaMismatch, check_models
    from app.orm import EventedBase
    from app.registry import ModelsNotFound, load_models

    try:
        load_models(settings)
        check_models(EventedBase)
    except (ModelsNotFound, ModelSchemaMismatch) as exc:
        raise StartupError(str(exc)) from None


async def init_db(settings: Settings) -> list[str]:
    """Create tables and the outbox, and the services' roles with their privileges.

    Runs as `DATABASE_URL`'s role, which owns the tables. A password in a service's own URL
    (`DATABASE_URL_<SERVICE>`) becomes its role's password. Returns the roles.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    from app.capture import roles
    from app.orm import EventedBase
    from app.schema import create_schema

    check_models_agree(settings)  # before a table is created from a model that would drop a column
    await check_database(settings)
    try:
        passwords = roles.role_passwords(dict(settings.service_database_urls), settings.db_role_prefix)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    # The tables' owner, provisioning: a plain engine, no service's handle or checks.
    engine = create_async_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(create_schema)
            return await conn.run_sync(lambda c: roles.provision(
                c, EventedBase, settings.db_role_prefix, passwords))
    finally:
        await engine.dispose()

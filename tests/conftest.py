"""Fixtures: real PostgreSQL and Redis (from the environment or embedded) and an embedded broker."""
from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

import models  # noqa: F401  # registers the demo models on EventedBase
from app.capture import roles
from app.cli.preflight import init_db
from app.embedded.broker import EmbeddedBroker
from app.embedded.postgres import EmbeddedPostgres
from app.orm import Database, EventedBase
from app.outbox.relay import Relay
from app.settings import Settings
from tests.waiting import until

#: The fault tests, longest first (seconds measured 2026-12-07): under `pytest -n N` they are
#: handed out first, so each test process starts with its share of the long ones and the short
#: tests fill in around them, instead of one long fault starting last.
LONGEST_FIRST = ("rolling_restarts", "worker_killed_five_times", "two_workers_started_onto_a_backlog",
                 "storm_of_every_fault", "surviving_worker_takes_over", "worker_paused", "broker_paused",
                 "worker_added_during_a_backlog", "billing_killed", "redis_restarted", "postgres_restart",
                 "poison_on_every_input_topic")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns the groups into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `pytest -n N --dist loadgroup`: each fault test is a group of its own, handed out
    first; every other module is one group, so its module-scoped servers (a worker, a browser)
    start in one test process only. Measured 2026-12-07 on 2 cores, `.ci/run`'s servers: 16.5
    min in one process; handed out one by one (`--dist load`, each module's servers started in
    every process that ran one of its tests) 10.0 min on 2 processes, 10.5 on 3; grouped
    (`--dist loadgroup`) 9.0 min on 2, 8.0 on 3 (`make test`). Most tests wait on servers, so a
    third process on 2 cores still shortens the run."""
    if not getattr(config.option, "numprocesses", None):
        return  # one process: the usual order

    def rank(item: pytest.Item) -> int:
        return next((i for i, part in enumerate(LONGEST_FIRST) if part in item.name), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: everything else keeps its order, after the faults
    for item in items:
        fault = rank(item) < len(LONGEST_FIRST)
        item.add_marker(pytest.mark.xdist_group(name=item.name if fault else item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for the servers this test session starts."""
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def pg_server_url(run_dir: Path) -> Iterator[str]:
    """`DATABASE_URL` when set, else an embedded PostgreSQL started for this session."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres.start(run_dir / "postgres")
    try:
        yield server.url
    finally:
        server.remove()  # the cluster too: tests leave nothing behind


@pytest.fixture(scope="session")
async def role_prefix(pg_server_url: str) -> AsyncIterator[str]:
    """Service roles of this session's own (roles are cluster-wide), dropped at the very end."""
    prefix = f"mse_t{uuid.uuid4().hex[:8]}_"
    yield prefix
    # Set up before the database, so torn down after it: then no grant holds the roles.
    engine = create_async_engine(pg_server_url)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: roles.drop_roles(c, EventedBase, prefix))
    await engine.dispose()


@pytest.fixture(scope="session")
async def database_url(pg_server_url: str, role_prefix: str) -> AsyncIterator[str]:
    """A database of its own for this test session, dropped at the end."""
    base = pg_server_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    name = f"mse_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(base)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = pg_server_url.rsplit("/", 1)[0] + "/" + name
    yield url
    conn = await asyncpg.connect(base)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


@pytest.fixture(scope="session")
def broker(run_dir: Path) -> Iterator[EmbeddedBroker]:
    """The Tansu broker, always embedded (memory-only, started for this session)."""
    server = EmbeddedBroker.start(run_dir / "broker")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka(broker: EmbeddedBroker) -> Settings:
    """Settings with only the broker: these commands need no database."""
    return Settings(kafka_broker=broker.url)


@pytest.fixture(scope="session")
def settings(database_url: str, broker: EmbeddedBroker, role_prefix: str) -> Settings:
    """Settings pointing at this session's servers, as `make dev` and Compose run the processes.

    `database_url` is the tables' owner (`init-db` alone uses it); every service, the worker
    included, connects as its own role through `database_url_for(service)`: what PostgreSQL
    lets that role do is what the tests see. A test that needs the owner says why.
    """
    return Settings(database_url=database_url, kafka_broker=broker.url, service_name="orders",
                    relay_poll_interval=0.5, db_role_prefix=role_prefix,
                    service_database_urls=tuple(sorted(
                        roles.service_urls(EventedBase, role_prefix, database_url).items())))


@pytest.fixture(scope="session")
async def schema(settings: Settings) -> None:
    """Entity tables, the outbox and the services' roles, created once per session."""
    await init_db(settings)


@pytest.fixture
async def db(settings: Settings, schema: None) -> AsyncIterator[Database]:
    """The orders service's Database, on its role; the outbox is emptied before and after.

    Entity ids are never restarted, so every test's keys are new on the session's topics.
    """
    database = Database(settings.database_url_for(settings.service_name), service=settings.service_name)
    await clear_outbox(settings)
    yield database
    await clear_outbox(settings)
    await database.close()


@pytest.fixture
async def worker_db(settings: Settings, schema: None) -> AsyncIterator[Database]:
    """A Database on the stream worker's role: what the relay and the cache read (the outbox,
    every entity's non-sensitive columns and sequences), reads not recorded."""
    database = Database(settings.database_url_for(roles.WORKER), service=roles.WORKER,
                        record_reads=False)
    yield database
    await database.close()


async def clear_outbox(settings: Settings) -> None:
    """Empty the outbox, as the tables' owner: no service's role may read or delete it."""
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        await conn.execute("DELETE FROM outbox")
    finally:
        await conn.close()


@pytest.fixture
async def relay(settings: Settings, db: Database) -> AsyncIterator[Relay]:
    """The outbox relay running in this test's event loop."""
    r = Relay(settings, standby_poll=0.1)
    task = asyncio.get_running_loop().create_task(r.run())
    # Ready once it holds shards, which it takes after creating the topics: a test's
    # TopicReader started before that would never see them (aiokafka caches the metadata).
    await until(lambda: r.stats.active or task.done(), what="relay holds its shards")
    if task.done():
        task.result()  # a relay that failed to start fails the test with its own error
    yield r
    r.stop()
    await asyncio.wait_for(task, 20)


def own_redis_database(url: str, offset: int) -> str:
    """`url` with its database number moved up by `offset`, emptied."""
    import redis

    base, _, number = url.rpartition("/")
    database = (int(number) if number.isdigit() else 0) + offset
    own = f"{base}/{database}" if number.isdigit() else f"{url.rstrip('/')}/{database}"
    client = redis.Redis.from_url(own)
    try:
        client.flushdb()
    finally:
        client.close()
    return own


@pytest.fixture(scope="session")
def redis_url(run_dir: Path, worker_id: str) -> Iterator[str]:
    """`REDIS_URL` when set, else an embedded Redis started for this session.

    Under `pytest -n N` each test process takes a database of its own: `REDIS_URL`'s for the
    first, the next ones for the others (`/9` -> `/10`, ...), emptied first, as `.ci/run` empties
    `REDIS_URL`'s: entity ids restart in each session's PostgreSQL database, so two sessions in
    one Redis database would read each other's entries as cache hits.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        index = int(worker_id.removeprefix("gw")) if worker_id.startswith("gw") else 0
        if index:
            url = own_redis_database(url, index)
        yield url
        return
    from app.embedded.redis import EmbeddedRedis

    server = EmbeddedRedis.start(run_dir / "redis")
    try:
        yield server.url
    finally:
        server.stop()

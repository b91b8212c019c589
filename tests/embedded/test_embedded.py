"""Real-server tests for app.embedded: each server is started, used by a real client, then stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.embedded.broker import EmbeddedBroker
from app.embedded.postgres import EmbeddedPostgres
from app.embedded.process import EmbeddedServerError, free_port, wait_for_port
from app.embedded.redis import EmbeddedRedis


def pid_gone(pid: int) -> bool:
    """True if no process with `pid` exists (stop() reaps, so no zombie is left behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def proc_state(pid: int) -> str:
    """Single-letter scheduler state from /proc (R, S, T = stopped, ...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name in parentheses may contain spaces, so split after the closing paren.
    return stat.rsplit(")", 1)[1].split()[0]


def asyncpg_dsn(pg: EmbeddedPostgres) -> str:
    """asyncpg does not understand SQLAlchemy's '+asyncpg' driver suffix."""
    return pg.url.replace("postgresql+asyncpg://", "postgresql://")


@pytest.fixture
def embedded_pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A fresh PostgreSQL cluster, stopped and deleted at teardown whatever the test did."""
    pg = EmbeddedPostgres.start(tmp_path / "pg")
    try:
        yield pg
    finally:
        pg.remove()


@pytest.fixture
def embedded_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A fresh redis-server, stopped at teardown."""
    with EmbeddedRedis.start(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A fresh in-memory Tansu broker, stopped at teardown."""
    with EmbeddedBroker.start(tmp_path / "kafka") as server:
        yield server


def test_wait_for_port_names_server_and_address() -> None:
    """A timeout error says which server and which address never came up."""
    port = free_port()
    with pytest.raises(TimeoutError, match=rf"widget did not accept connections on 127\.0\.0\.1:{port}"):
        wait_for_port("127.0.0.1", port, 0.2, name="widget")


def test_start_fails_clearly_when_port_is_taken(tmp_path: Path) -> None:
    """A server that cannot bind is reported with its log, not mistaken for the port's owner."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match="Address already in use"):
            EmbeddedRedis.start(tmp_path / "redis", port=port, timeout=5)


async def test_postgres_select_then_stop(embedded_pg: EmbeddedPostgres) -> None:
    """asyncpg can query the server; stop() is quick even with a client connected."""
    assert embedded_pg.url == f"postgresql+asyncpg://postgres@127.0.0.1:{embedded_pg.port}/postgres"
    # `pid` must be the postmaster itself, not a wrapper like runuser.
    assert int((embedded_pg.pgdata / "postmaster.pid").read_text().split()[0]) == embedded_pg.pid

    conn = await asyncpg.connect(asyncpg_dsn(embedded_pg))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW fsync") == "off"
        assert await conn.fetchval("SHOW max_connections") == "200"
        pid = embedded_pg.pid
        # Fast shutdown disconnects clients instead of waiting for them (as SIGTERM would).
        started = time.monotonic()
        embedded_pg.stop()
        # A smart shutdown (plain SIGTERM) would wait for our open connection forever; 20 s
        # bounds "did not wait for it" with room for a loaded machine's checkpoint.
        assert time.monotonic() - started < 20
    finally:
        conn.terminate()
    assert pid_gone(pid)
    assert not embedded_pg.running
    embedded_pg.stop()  # idempotent


async def test_postgres_restart_keeps_data(embedded_pg: EmbeddedPostgres) -> None:
    """restart() keeps port and data; after kill() the server recovers and restarts."""
    conn = await asyncpg.connect(asyncpg_dsn(embedded_pg))
    await conn.execute("CREATE TABLE kept (v text)")
    await conn.execute("INSERT INTO kept VALUES ('survives')")
    await conn.close()

    old_pid, port = embedded_pg.pid, embedded_pg.port
    embedded_pg.restart()
    assert embedded_pg.port == port
    assert embedded_pg.pid != old_pid
    assert pid_gone(old_pid)
    conn = await asyncpg.connect(asyncpg_dsn(embedded_pg))
    assert await conn.fetchval("SELECT v FROM kept") == "survives"
    conn.terminate()

    # Crash: SIGKILL the postmaster, then bring it back through crash recovery.
    killed = embedded_pg.pid
    embedded_pg.kill()
    assert pid_gone(killed)
    embedded_pg.restart()
    conn = await asyncpg.connect(asyncpg_dsn(embedded_pg))
    # The row was checkpointed by the clean restart above, so the crash cannot lose it.
    assert await conn.fetchval("SELECT v FROM kept") == "survives"
    await conn.close()


async def test_redis_set_get_then_stop(embedded_redis: EmbeddedRedis) -> None:
    """redis.asyncio can SET/GET; restart() keeps the port (not the data); stop() ends the pid."""
    assert embedded_redis.url == f"redis://127.0.0.1:{embedded_redis.port}/0"
    client = aioredis.from_url(embedded_redis.url)
    try:
        await client.set("greeting", "hello")
        assert await client.get("greeting") == b"hello"

    finally:
        await client.aclose()

    old_pid, port = embedded_redis.pid, embedded_redis.port
    embedded_redis.restart()
    assert pid_gone(old_pid)
    assert embedded_redis.port == port
    # A fresh client: pooled connections to the old process are dead and fail once.
    client = aioredis.from_url(embedded_redis.url)
    try:
        # No persistence (--save "" --appendonly no): a restarted redis is empty.
        assert await client.get("greeting") is None
    finally:
        await client.aclose()

    pid = embedded_redis.pid
    embedded_redis.stop()
    assert pid_gone(pid)
    embedded_redis.stop()  # idempotent


async def produce_and_consume(broker: EmbeddedBroker, topic: str, value: bytes) -> bytes:
    """Produce one message to `topic` and read it back from the beginning of its partition."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        # The topic does not exist yet; the broker auto-creates it on first metadata request.
        meta = await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()

    # No group_id and manual assign(): consumer-group joins are slow on this broker.
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
    await consumer.start()
    try:
        tp = TopicPartition(topic, meta.partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        message = await asyncio.wait_for(consumer.getone(), 10)
        received: bytes = message.value
        return received
    finally:
        await consumer.stop()


async def test_broker_produce_consume_then_stop(embedded_broker: EmbeddedBroker) -> None:
    """aiokafka round-trips a message through the broker; stop() ends the pid."""
    assert embedded_broker.bootstrap == f"127.0.0.1:{embedded_broker.port}"
    assert embedded_broker.url == f"kafka://127.0.0.1:{embedded_broker.port}"
    topic = f"embedded-{uuid.uuid4().hex[:8]}"
    assert await produce_and_consume(embedded_broker, topic, b"hello kafka") == b"hello kafka"

    pid = embedded_broker.pid
    embedded_broker.stop()
    assert pid_gone(pid)
    embedded_broker.stop()  # idempotent


async def test_broker_pause_resume(embedded_broker: EmbeddedBroker) -> None:
    """A paused broker answers nothing; after resume() the pending send completes."""
    topic = f"paused-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=embedded_broker.bootstrap, request_timeout_ms=30_000)
    await producer.start()
    try:
        # Explicit partition: auto-created topics have several partitions on this broker.
        await producer.send_and_wait(topic, b"before", partition=0)  # topic metadata is now cached

        embedded_broker.pause()
        assert proc_state(embedded_broker.pid) == "T"
        pending = await producer.send(topic, b"during", partition=0)
        done, _ = await asyncio.wait({pending}, timeout=1.0)
        assert not done, "a SIGSTOPped broker must not acknowledge anything"

        embedded_broker.resume()
        assert proc_state(embedded_broker.pid) != "T"
        meta = await asyncio.wait_for(pending, 10)
        assert meta.offset == 1
    finally:
        await producer.stop()

    # stop() must also work on a paused broker (it sends SIGCONT after SIGTERM).
    embedded_broker.pause()
    pid = embedded_broker.pid
    proc = embedded_broker._proc
    # A generous grace period, so that a stop which only ended by SIGKILL shows as one.
    embedded_broker.stop(timeout=60)
    # Without SIGCONT the paused broker never handles SIGTERM, and stop() ends it by SIGKILL.
    assert proc is not None and proc.returncode != -signal.SIGKILL, proc.returncode
    assert pid_gone(pid)


async def test_a_removed_cluster_leaves_nothing_behind(tmp_path: Path) -> None:
    """remove() deletes the cluster wherever it lives (as root: the shared store), not only its link."""
    pg = EmbeddedPostgres.start(tmp_path / "pg")
    cluster = pg.pgdata.resolve()
    assert (cluster / "PG_VERSION").exists()
    pg.remove()
    assert not cluster.exists() and not (tmp_path / "pg" / "pgdata").exists()
    assert not pg.running
    assert (tmp_path / "pg" / "postgres.log").exists()  # the log is kept for whoever reads it

"""The transactional inbox against real PostgreSQL and the session's Tansu (a fresh topic per test).

Each test's handler appends one row per call to a table of its own, without deduplicating:
the counts there are what the inbox really applied.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.capture.roles import role_name
from app.inbox.consumer import Inbox, SequenceGap
from app.inbox.events import InboxEvent
from app.orm import Database
from app.settings import Settings
from app.topology import inbox_dead_letter_topic
from app.wire.messages import encode_message
from app.wire.schemas import load
from tests.kafka import TopicReader
from tests.waiting import until

ORDERS = load("orders", 2)


def order_event(key: str, sequence: int, *, status: str = "paid", amount: int = 1000,
                op: str = "update") -> tuple[bytes, list[tuple[str, bytes]], str]:
    """An orders-v2 event of order `key` (value, headers, event id)."""
    event_id = str(uuid.uuid4())
    now = datetime.now(timezone.utc)
    record = {"event_id": event_id, "message_version": 1, "schema_version": 2, "service": "orders",
              "entity": "orders", "key": key, "op": op, "occurred_at": now, "sequence": sequence,
              "data": None if op == "delete" else {
                  "id": int(key), "customer_id": 1, "amount_cents": amount, "currency": "EUR",
                  "status": status, "created_at": now, "updated_at": now, "shipping": None}}
    value, headers = encode_message(ORDERS, record)
    return value, headers, event_id


class Feed:
    """A fresh 2-partition topic read as orders v2, and a producer onto it (keys keep order)."""

    def __init__(self, kafka: Settings) -> None:
        self.kafka = kafka
        self.topic = f"inboxtest{uuid.uuid4().hex[:8]}-v2"
        self.producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")

    async def send(self, key: str, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        await self.producer.send_and_wait(self.topic, value, key=key.encode(), headers=headers or [])

    async def event(self, key: str, sequence: int, **kwargs: Any) -> str:
        value, headers, event_id = order_event(key, sequence, **kwargs)
        await self.send(key, value, headers)
        return event_id

    async def rewind(self, consumer: str) -> None:
        """Commit offset 0 for `consumer` on every partition, as a replay or a lost commit would."""
        reset = AIOKafkaConsumer(bootstrap_servers=self.kafka.bootstrap_servers, group_id=consumer,
                                 enable_auto_commit=False)
        await reset.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in (0, 1)]
            reset.assign(tps)
            await reset.commit({tp: 0 for tp in tps})
        finally:
            await reset.stop()


@pytest.fixture
async def feed(kafka: Settings) -> AsyncIterator[Feed]:
    f = Feed(kafka)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f.topic, 2, 1)])
    finally:
        await admin.close()
    await f.producer.start()
    yield f
    await f.producer.stop()


class Applied:
    """A table of its own the handler appends to: (event id, key, sequence) per call."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.table = f"applied_{uuid.uuid4().hex[:8]}"
        self.fail_keys: set[str] = set()
        self.fail_once: set[str] = set()

    async def create(self) -> None:
        # As the tables' owner, as `init-db` creates a service's tables; the service's role
        # (`db`'s, orders) gets to write it.
        conn = await asyncpg.connect(self.settings.asyncpg_dsn)
        try:
            await conn.execute(f"CREATE TABLE {self.table} (event_id uuid, key text, sequence bigint)")
            await conn.execute(f"GRANT SELECT, INSERT ON {self.table} TO "
                               f"{role_name(self.settings.db_role_prefix, self.settings.service_name)}")
        finally:
            await conn.close()

    async def drop(self) -> None:
        conn = await asyncpg.connect(self.settings.asyncpg_dsn)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {self.table}")
        finally:
            await conn.close()

    async def handler(self, session: AsyncSession, event: InboxEvent) -> None:
        await session.execute(text(f"INSERT INTO {self.table} VALUES (:id, :key, :seq)"),
                              {"id": event.event_id, "key": event.key, "seq": event.sequence})
        if event.key in self.fail_keys:
            raise ValueError(f"handler refuses order {event.key}")
        if event.key in self.fail_once:
            self.fail_once.discard(event.key)
            raise ValueError(f"handler fails once for order {event.key}")

    async def rows(self) -> list[tuple[str, str, int]]:
        async with self.db.engine.connect() as conn:
            result = await conn.execute(text(f"SELECT event_id::text, key, sequence FROM {self.table} "
                                             "ORDER BY key, sequence"))
            return [tuple(r) for r in result.all()]  # type: ignore[misc]


@pytest.fixture
async def applied(db: Database, settings: Settings) -> AsyncIterator[Applied]:
    a = Applied(db, settings)
    await a.create()
    yield a
    await a.drop()


@pytest.fixture
async def run_inbox(settings: Settings, db: Database, feed: Feed, applied: Applied
                    ) -> AsyncIterator[Callable[..., Awaitable[tuple[Inbox, asyncio.Task[None]]]]]:
    """Start an inbox on the feed in this loop; `stop_inbox` stops it. Consumers are stopped at the end."""
    started: list[tuple[Inbox, asyncio.Task[None]]] = []

    async def start(name: str | None = None, **kwargs: Any) -> tuple[Inbox, asyncio.Task[None]]:
        handler = kwargs.pop("handler", applied.handler)
        inbox = Inbox(settings.with_(consumer_fetch_max_wait_ms=10), db, name or f"orders.t{uuid.uuid4().hex[:8]}",
                      [feed.topic], handler, schema_of=lambda _: ORDERS, **kwargs)
        task = asyncio.get_running_loop().create_task(inbox.run())
        started.append((inbox, task))
        return inbox, task

    yield start
    for inbox, task in started:
        inbox.stop()
        await asyncio.wait_for(task, 20)


async def stop_inbox(inbox: Inbox, task: asyncio.Task[None]) -> None:
    inbox.stop()
    await asyncio.wait_for(task, 20)


async def test_a_consumer_started_before_its_topic_exists_shows_the_error_until_the_topic_appears(
        settings: Settings, db: Database, applied: Applied) -> None:
    topic = f"inboxtest{uuid.uuid4().hex[:8]}-v2"
    inbox = Inbox(settings.with_(consumer_fetch_max_wait_ms=10), db, f"orders.t{uuid.uuid4().hex[:8]}", [topic],
                  applied.handler, schema_of=lambda _: ORDERS)
    task = asyncio.get_running_loop().create_task(inbox.run())
    try:
        await until(lambda: inbox.stats.error, lambda error: "does not exist" in error, what="the missing topic")
        assert not inbox.stats.connected
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 2, 1)])
        finally:
            await admin.close()
        # The status (billing's /status.json shows these) says what fails now, not what once did.
        await until(lambda: (inbox.stats.error, inbox.stats.connected), lambda now: now == ("", True),
                    timeout=30, what="the error cleared once the topic exists")
        assert "does not exist" in inbox.stats.last_error and inbox.stats.last_error_at > 0
    finally:
        await stop_inbox(inbox, task)


async def test_each_event_is_applied_once_and_a_redelivery_is_skipped_as_a_duplicate(
        feed: Feed, applied: Applied, run_inbox: Any) -> None:
    ids = [await feed.event(str(key), 1) for key in range(1, 21)]
    inbox, task = await run_inbox(batch=7)
    await until(lambda: inbox.stats.applied, lambda n: n == 20, what="20 events applied")
    await stop_inbox(inbox, task)
    # The offsets are lost (a crash after the database commit, before the offset commit):
    await feed.rewind(inbox.name)
    again, task = await run_inbox(inbox.name, batch=7)
    await until(lambda: again.stats.skipped_duplicate, lambda n: n == 20, what="20 redeliveries skipped")
    await stop_inbox(again, task)
    rows = await applied.rows()
    assert sorted(r[0] for r in rows) == sorted(ids) and again.stats.applied == 0


async def test_a_replay_from_offset_0_after_the_ids_were_pruned_skips_every_event_as_old(
        db: Database, feed: Feed, applied: Applied, run_inbox: Any) -> None:
    for key in range(1, 6):
        for sequence in (1, 2, 3):
            await feed.event(str(key), sequence)
    inbox, task = await run_inbox(retention=0.0)
    await until(lambda: inbox.stats.applied, lambda n: n == 15, what="15 events applied")
    await stop_inbox(inbox, task)
    async with db.engine.begin() as conn:  # the retention passed: the event ids are forgotten
        await conn.execute(text("DELETE FROM inbox WHERE consumer = :c"), {"c": inbox.name})
    await feed.rewind(inbox.name)
    replay, task = await run_inbox(inbox.name)
    await until(lambda: replay.stats.skipped_old, lambda n: n == 15, what="the replay skipped as old")
    await stop_inbox(replay, task)
    assert replay.stats.applied == 0 and len(await applied.rows()) == 15


async def test_an_older_event_of_a_key_is_skipped_and_a_gap_is_counted(
        feed: Feed, applied: Applied, run_inbox: Any) -> None:
    for sequence in (1, 3, 2, 4):
        await feed.event("7", sequence)
    inbox, task = await run_inbox(batch=1)
    await until(lambda: inbox.stats.applied + inbox.stats.skipped_old, lambda n: n == 4, what="4 events seen")
    await stop_inbox(inbox, task)
    assert [r[2] for r in await applied.rows()] == [1, 3, 4]
    assert (inbox.stats.gaps, inbox.stats.skipped_old) == (1, 1)


async def test_strict_order_dead_letters_the_event_after_a_gap(
        kafka: Settings, feed: Feed, applied: Applied, run_inbox: Any) -> None:
    for sequence in (1, 3):
        await feed.event("8", sequence)
    inbox, task = await run_inbox(strict_order=True, max_attempts=2)
    await until(lambda: inbox.stats.dead_lettered, lambda n: n == 1, what="the event after the gap dead-lettered")
    await stop_inbox(inbox, task)
    assert [r[2] for r in await applied.rows()] == [1]
    async with TopicReader(kafka.bootstrap_servers, inbox_dead_letter_topic(feed.topic, inbox.name),
                           decode=False) as reader:
        [letter] = await reader.wait_for(lambda got: len(got) == 1)
    assert letter.headers["dlq_error_class"] == SequenceGap.__name__.encode()
    assert letter.headers["dlq_source_topic"] == feed.topic.encode()


async def test_a_failing_handler_is_retried_then_dead_lettered_and_the_batch_around_it_applied(
        kafka: Settings, feed: Feed, applied: Applied, run_inbox: Any) -> None:
    applied.fail_keys = {"13"}
    applied.fail_once = {"15"}
    for key in range(10, 20):
        await feed.event(str(key), 1)
    inbox, task = await run_inbox(batch=10, max_attempts=3)
    await until(lambda: (inbox.stats.applied, inbox.stats.dead_lettered), lambda n: n == (9, 1),
                what="9 applied, 1 dead-lettered")
    await stop_inbox(inbox, task)
    rows = await applied.rows()
    # Rolled back with its transaction, every failed attempt left no row.
    assert sorted(r[1] for r in rows) == sorted(str(k) for k in range(10, 20) if k != 13)
    async with TopicReader(kafka.bootstrap_servers, inbox_dead_letter_topic(feed.topic, inbox.name),
                           decode=False) as reader:
        [letter] = await reader.wait_for(lambda got: len(got) == 1)
    assert letter.key == "13" and letter.headers["dlq_error_class"] == b"ValueError"
    assert b"handler refuses order 13" in letter.headers["dlq_error_message"]
    # 13 three times on its own, and each batch holding 13 or 15 once (15 then went through).
    assert inbox.stats.handler_errors >= 3 + 1 and "15" in {r[1] for r in rows}


async def test_an_undecodable_message_is_dead_lettered_and_never_stops_the_consumer(
        kafka: Settings, feed: Feed, applied: Applied, run_inbox: Any) -> None:
    await feed.send("30", b"\xff\x00 not avro")
    await feed.event("31", 1)
    inbox, task = await run_inbox()
    await until(lambda: (inbox.stats.applied, inbox.stats.dead_lettered), lambda n: n == (1, 1),
                what="the poison dead-lettered and the next event applied")
    await stop_inbox(inbox, task)
    async with TopicReader(kafka.bootstrap_servers, inbox_dead_letter_topic(feed.topic, inbox.name),
                           decode=False) as reader:
        [letter] = await reader.wait_for(lambda got: len(got) == 1)
    assert letter.value == b"\xff\x00 not avro"


async def test_writes_of_the_handler_raise_their_events_only_when_the_event_is_applied(
        db: Database, worker_db: Database, settings: Settings, feed: Feed, run_inbox: Any) -> None:
    from services.billing import apply_order_event

    # Order ids no real order of this session has (ids count up from 1), so no other test's
    # invoice of the same order can be found here.
    base = 8_000_000_000 + uuid.uuid4().int % 1_000_000_000
    paid, refused, pending = (str(base + i) for i in range(3))

    async def billing(session: AsyncSession, event: InboxEvent) -> None:
        await apply_order_event(session, event)
        await session.flush()  # the invoice row is written before the handler fails
        if event.key == refused:
            raise ValueError(f"billing refuses order {refused}")

    await feed.event(paid, 1, status="paid", amount=1234)
    await feed.event(refused, 1, status="paid", amount=99)
    await feed.event(pending, 1, status="pending")
    billing_db = Database(settings.database_url_for("billing"), service="billing")
    try:
        inbox = Inbox(settings, billing_db, f"billing.t{uuid.uuid4().hex[:6]}", [feed.topic], billing,
                      schema_of=lambda _: ORDERS, max_attempts=2)
        task = asyncio.get_running_loop().create_task(inbox.run())
        await until(lambda: (inbox.stats.applied, inbox.stats.dead_lettered), lambda n: n == (2, 1),
                    what="two applied, one dead-lettered")
        await stop_inbox(inbox, task)
    finally:
        await billing_db.close()
    ids = [int(paid), int(refused), int(pending)]
    async with worker_db.engine.connect() as conn:  # reads invoices' public columns and the outbox
        invoices = (await conn.execute(text(
            "SELECT order_id, amount_cents FROM invoices WHERE order_id = ANY(:ids)"), {"ids": ids})).all()
        events = (await conn.execute(text(
            "SELECT key, op, service FROM outbox WHERE entity = 'invoices' AND (data->>'order_id')::bigint = ANY(:ids)"
        ), {"ids": ids})).all()
    assert [tuple(r) for r in invoices] == [(int(paid), 1234)]
    assert [(r[1], r[2]) for r in events] == [("create", "billing")]


async def test_a_batch_handler_gets_each_transactions_events_in_order_and_a_failing_batch_is_split(
        feed: Feed, applied: Applied, run_inbox: Any) -> None:
    calls: list[list[tuple[str, int]]] = []

    async def batch(session: AsyncSession, events: list[InboxEvent]) -> None:
        calls.append([(e.key, e.sequence) for e in events])
        for event in events:
            await applied.handler(session, event)

    applied.fail_once = {"52"}
    for sequence in (1, 2, 3):
        for key in ("51", "52"):
            await feed.event(key, sequence)
    inbox, task = await run_inbox(handler=None, batch_handler=batch, batch=100)
    await until(lambda: inbox.stats.applied, lambda n: n == 6, what="6 events applied")
    await stop_inbox(inbox, task)
    rows = await applied.rows()
    assert [(r[1], r[2]) for r in rows] == [("51", 1), ("51", 2), ("51", 3), ("52", 1), ("52", 2), ("52", 3)]
    # Per key, each call saw the events in order; the batch that failed was retried one by one.
    for call in calls:
        for key in ("51", "52"):
            mine = [seq for k, seq in call if k == key]
            assert mine == sorted(mine)
    assert any(len(call) > 1 for call in calls) and any(len(call) == 1 for call in calls)

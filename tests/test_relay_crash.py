"""The relay as its own process: killed in the middle of a backlog, it loses nothing."""
from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import insert, text

from app.embedded import EmbeddedBroker
from app.orm import Database
from app.settings import Settings
from models import Order
from tests.kafka import TopicReader
from tests.processes import spawn_app, stop
from tests.waiting import until

BACKLOG = 20_000


async def pending(db: Database) -> int:
    async with db.engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM outbox WHERE topic = 'orders-v2'"))).scalar_one()


async def wait_pending(db: Database, condition: Callable[[int], bool], timeout: float = 60) -> int:
    return await until(lambda: pending(db), condition, timeout, "outbox row count")


async def test_relay_killed_mid_batch_loses_nothing(db: Database, settings: Settings, tmp_path: Path) -> None:
    # A broker of its own: 20,000 events on the session's topics would make every later
    # test's worker (a new consumer group, reading from the start) replay them.
    broker = EmbeddedBroker.start(tmp_path / "broker")
    try:
        await _relay_killed_mid_batch_loses_nothing(db, settings.with_(kafka_broker=broker.url), tmp_path)
    finally:
        broker.stop()


async def _relay_killed_mid_batch_loses_nothing(db: Database, settings: Settings, tmp_path: Path) -> None:
    async with db.session() as s:
        result = await s.execute(
            insert(Order).returning(Order.id),
            [{"customer_id": 1, "amount_cents": i, "currency": "EUR"} for i in range(BACKLOG)],
        )
        keys = {str(i) for i in result.scalars().all()}
    assert len(keys) == BACKLOG and await pending(db) == BACKLOG  # bulk insert: one event per row

    relay = spawn_app(settings, "relay", log=tmp_path / "relay1.log")
    try:
        left = await wait_pending(db, lambda n: n < BACKLOG - 3000)
    finally:
        stop(relay, signal.SIGKILL)
    assert left > 0, "the relay finished before it could be killed mid-backlog"
    relay = spawn_app(settings, "relay", log=tmp_path / "relay2.log")
    try:
        await wait_pending(db, lambda n: n == 0)
    finally:
        stop(relay)
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: keys <= {m.key for m in ms}, timeout=60)
        mine = reader.for_keys(keys)
    by_key: dict[str, set[str]] = {}
    for m in mine:
        by_key.setdefault(m.key, set()).add(m.record["event_id"])
    assert set(by_key) == keys
    # Re-published duplicates carry the event id of the original: one logical event per row.
    assert all(len(ids) == 1 for ids in by_key.values())

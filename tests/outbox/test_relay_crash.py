"""The relay as its own process: killed in the middle of a backlog, it loses nothing."""
from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, text

from app.embedded.broker import EmbeddedBroker
from app.embedded.process import free_port
from app.orm import Database
from app.outbox.relay import RELAY_LOCK, Relay
from app.outbox.store import SHARDS
from app.settings import Settings
from app.views import apply_event, plain_state
from models import Order
from tests.http import get_json, get_text
from tests.kafka import TopicReader
from tests.processes import listening, spawn_app, stop
from tests.waiting import until

BACKLOG = 20_000


async def pending(worker_db: Database) -> int:
    """Rows left in the outbox, read on the worker's role: the relay's, the one that may."""
    async with worker_db.engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM outbox WHERE topic = 'orders-v2'"))).scalar_one()


async def wait_pending(worker_db: Database, condition: Callable[[int], bool], timeout: float = 60) -> int:
    return await until(lambda: pending(worker_db), condition, timeout, "outbox row count")


async def test_relay_killed_mid_batch_loses_nothing(db: Database, worker_db: Database, settings: Settings,
                                                     tmp_path: Path) -> None:
    # A broker of its own: 20,000 events on the session's topics would make every later
    # test's worker (a new consumer group, reading from the start) replay them.
    broker = EmbeddedBroker.start(tmp_path / "broker")
    try:
        await _relay_killed_mid_batch_loses_nothing(db, worker_db, settings.with_(kafka_broker=broker.url), tmp_path)
    finally:
        broker.stop()


async def _relay_killed_mid_batch_loses_nothing(db: Database, worker_db: Database, settings: Settings,
                                                tmp_path: Path) -> None:
    async with db.session() as s:
        result = await s.execute(
            insert(Order).returning(Order.id),
            [{"customer_id": 1, "amount_cents": i, "currency": "EUR"} for i in range(BACKLOG)],
        )
        keys = {str(i) for i in result.scalars().all()}
    assert len(keys) == BACKLOG and await pending(worker_db) == BACKLOG  # bulk insert: one event per row

    relay = spawn_app(settings, "relay", log=tmp_path / "relay1.log")
    try:
        left = await wait_pending(worker_db, lambda n: n < BACKLOG - 3000)
    finally:
        stop(relay, signal.SIGKILL)
    assert left > 0, "the relay finished before it could be killed mid-backlog"
    relay = spawn_app(settings, "relay", log=tmp_path / "relay2.log")
    try:
        await wait_pending(worker_db, lambda n: n == 0)
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


async def test_a_crash_between_ack_and_delete_republishes_with_the_same_event_id(
        db: Database, worker_db: Database, settings: Settings) -> None:
    async with db.session() as s:
        orders = [Order(customer_id=18_003, amount_cents=100 + i, currency="EUR") for i in range(20)]
        s.add_all(orders)
    keys = {str(o.id) for o in orders}
    relay = Relay(settings, standby_poll=0.1)
    publish, crashes = relay._publish, []

    async def publish_then_crash(producer: Any, rows: list[Any]) -> None:
        await publish(producer, rows)  # every message acked (acks=all) ...
        if not crashes:
            crashes.append(len(rows))
            # ... and the relay dies before it deletes the rows: they are published again.
            raise ConnectionResetError("injected: crash between ack and delete")

    relay._publish = publish_then_crash  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(relay.run())
    try:
        await wait_pending(worker_db, lambda n: n == 0)
    finally:
        relay.stop()
        await asyncio.wait_for(task, 20)
    assert crashes and relay.stats.errors >= 1
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        mine = [m for m in await reader.read_to_end() if m.key in keys]
    ids: dict[str, set[str]] = {}
    for m in mine:
        ids.setdefault(m.key, set()).add(m.record["event_id"])
    assert set(ids) == keys and all(len(v) == 1 for v in ids.values())  # one logical event per write
    assert len(mine) >= 2 * len(keys), "the crash did not republish: nothing was proven"
    # Consumers deduplicate: the views' apply step takes each event once, whatever the copies.
    stored: dict[str, Any] = {}
    applied = 0
    for m in sorted(mine, key=lambda m: (m.partition, m.offset)):
        result = apply_event(m.key, stored.get(m.key), m.record["sequence"], plain_state(m.record["data"]),
                             m.partition)
        if result is not None:
            stored[m.key] = result[0]
            applied += 1
    assert applied == len(keys)


async def test_relay_process_serves_metrics_and_health_while_it_publishes(
        db: Database, worker_db: Database, settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    relay = spawn_app(settings, "relay", log=tmp_path / "relay.log", RELAY_WEB_PORT=str(port))
    base = f"http://127.0.0.1:{port}"

    async def ready() -> int:
        try:
            return (await get_json(f"{base}/health/ready"))[0]
        except OSError:
            return 0  # not listening yet

    try:
        await until(ready, lambda status: status == 200, timeout=30, what="the relay process ready")
        assert listening(relay.pid, port) == {"127.0.0.1"}  # WEB_HOST: loopback unless asked
        async with db.session() as s:
            order = Order(customer_id=18_004, amount_cents=321, currency="EUR")
            s.add(order)
        await wait_pending(worker_db, lambda n: n == 0)

        async def published() -> float:
            status, body = await get_text(f"{base}/metrics")
            assert status == 200
            samples = {line.split()[0]: float(line.split()[1]) for line in body.splitlines()
                       if line.startswith("mse_") and " " in line}
            assert samples["mse_relay_connected"] == 1.0
            return samples["mse_relay_published_total"]

        assert await until(published, lambda n: n >= 1, timeout=10, what="a published event in /metrics") >= 1
        status, live = await get_json(f"{base}/health/live")
        assert status == 200 and live == {"live": True}
        status, ready = await get_json(f"{base}/health/ready")
        # The shards it publishes (all 16 unless another relay shares them).
        assert status == 200 and ready["shards"] and set(ready["shards"]) <= set(range(SHARDS)), ready
    finally:
        stop(relay)
    assert relay.returncode == 0, (tmp_path / "relay.log").read_text()


async def relay_pids(db: Database) -> set[int]:
    """Backend PIDs of the relays holding outbox shards in this database."""
    async with db.engine.connect() as conn:
        rows = await conn.execute(text(
            "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = :lock AND objsubid = 2 "
            "AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"lock": RELAY_LOCK})
        return {r[0] for r in rows}


async def test_one_of_two_relays_killed_under_load_loses_and_reorders_nothing(
        db: Database, worker_db: Database, settings: Settings, tmp_path: Path) -> None:
    broker = EmbeddedBroker.start(tmp_path / "broker")  # only this test's events on its topics
    try:
        await _one_of_two_relays_killed(db, worker_db, settings.with_(kafka_broker=broker.url), tmp_path)
    finally:
        broker.stop()


async def _one_of_two_relays_killed(db: Database, worker_db: Database, settings: Settings,
                                    tmp_path: Path) -> None:
    writes: dict[str, int] = {}  # order id -> events its writes raised (create + updates)
    stop_writing = asyncio.Event()
    rng = random.Random(7)
    # A backlog first, each key's events far apart in the outbox (creates, then rounds of
    # updates): both relays start in the middle of it, so the one killed leaves rows behind
    # that are older than rows the survivor already published. Only sharding by key keeps
    # a key's events in one relay's hands (checked: sharding by row id reorders here).
    ids: list[int] = []
    for _ in range(6):
        async with db.session() as s:
            new = [Order(customer_id=31_337, amount_cents=100, currency="EUR") for _ in range(500)]
            s.add_all(new)
        ids += [o.id for o in new]
    writes.update({str(i): 1 for i in ids})
    for _ in range(3):
        for start in range(0, len(ids), 500):
            async with db.session() as s:
                for order in (await s.execute(select(Order).where(Order.id.in_(ids[start:start + 500])))).scalars():
                    order.amount_cents += 1
                    writes[str(order.id)] += 1

    async def writer() -> None:
        while not stop_writing.is_set():
            async with db.session() as s:
                new = [Order(customer_id=31_337, amount_cents=100, currency="EUR") for _ in range(10)]
                s.add_all(new)
                for order in (await s.execute(select(Order).where(Order.id.in_(rng.sample(ids, 10))))).scalars():
                    order.amount_cents += 1  # an update: the next sequence of its key
                    writes[str(order.id)] += 1
            for order in new:
                ids.append(order.id)
                writes[str(order.id)] = 1
            await asyncio.sleep(0.01)  # paces the load (~50 commits/s); nothing is waited for here

    # Small batches: the relays take seconds over the backlog instead of one poll interval.
    relays = [spawn_app(settings, "relay", log=tmp_path / f"relay{i}.log", RELAY_WEB_PORT="0", RELAY_BATCH="20")
              for i in (1, 2)]
    try:
        task = asyncio.get_running_loop().create_task(writer())
        try:
            # Both relays publish: each holds shards of its own.
            await until(lambda: relay_pids(db), lambda pids: len(pids) == 2, timeout=30,
                        what="two relays holding shards")
            async with worker_db.engine.connect() as conn:
                left = await until(lambda: conn.scalar(text("SELECT count(*) FROM outbox")), lambda n: n < 10_000,
                                   timeout=30, what="the relays into the backlog")
            stop(relays[0], signal.SIGKILL)  # mid-backlog: some of its rows published and not deleted
            assert left > 1_000, "the backlog was nearly gone before the kill: nothing was proven"
            await until(lambda: relay_pids(db), lambda pids: len(pids) == 1, timeout=10,
                        what="the dead relay's locks gone")
            written = len(writes)
            await until(lambda: len(writes), lambda n: n >= written + 200, timeout=30,
                        what="orders written after the kill")
        finally:
            stop_writing.set()
            await task
        async with worker_db.engine.connect() as conn:
            await until(lambda: conn.scalar(text("SELECT count(*) FROM outbox")), lambda n: n == 0, timeout=60,
                        what="the survivor publishing every shard")
    finally:
        for relay in relays:  # by PID, whatever failed above
            stop(relay)
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        messages = await reader.read_to_end()
    sequences: dict[str, list[int]] = {}
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        sequences.setdefault(m.key, []).append(m.record["sequence"])
    lost = {k: n for k, n in writes.items() if set(range(1, n + 1)) - set(sequences.get(k, []))}
    reordered = []
    for key, seqs in sequences.items():
        seen: set[int] = set()
        for seq in seqs:  # a re-published copy may repeat what came before; nothing new may come late
            if seq not in seen and seen and seq < max(seen):
                reordered.append(key)
            seen.add(seq)
    assert not lost, f"{len(lost)} orders lost events: {dict(list(lost.items())[:5])}"
    assert not reordered, f"{len(reordered)} keys reordered: {reordered[:5]}"
    assert sum(writes.values()) > len(writes), "no updates were written: per-key order was not exercised"

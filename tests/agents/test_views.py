"""The Faust views equal the database after random writes and a replay of duplicates."""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from app.cli.topics import group_offsets
from app.embedded.process import free_port
from app.kafka import fetched_end_offsets, topic_partitions
from app.orm import Database
from app.settings import Settings
from app.views import present_count, present_state
from chaos.agreement import orders_per_minute
from chaos.topiclog import Seen
from models import Order, OrderShipping
from models.order import CUSTOMER_ORDERS, ORDERS_PER_MINUTE
from tests.kafka import TopicReader
from tests.processes import start_worker, stop
from tests.waiting import until

WRITES = 2500


@pytest.fixture(scope="module")
async def view_worker(settings: Settings, schema: None, tmp_path_factory: pytest.TempPathFactory,
                      ) -> AsyncIterator[tuple[str, str]]:
    """A worker of its own consumer group; yields its web base URL and app id."""
    log = tmp_path_factory.mktemp("views") / "worker.log"
    port = free_port()
    app_id = f"mse-views-{uuid.uuid4().hex[:8]}"
    child: subprocess.Popen[bytes] = await start_worker(settings, log, APP_ID=app_id, WEB_PORT=str(port))
    yield f"http://127.0.0.1:{port}", app_id
    stop(child)


def fetch(url: str) -> Any:
    """GET a JSON document; None on 404."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


async def table_value(base: str, table: str, key: str) -> Any:
    return await asyncio.to_thread(fetch, f"{base}/table/{table}/{key}/")


async def random_writes(db: Database, customers: list[int], n: int, seed: int) -> list[int]:
    """Creates, updates, deletes and extension writes from 8 concurrent writers."""
    rng = random.Random(seed)
    ids: list[int] = []

    async def writer(count: int) -> None:
        for _ in range(count):
            try:
                await write_one()
            except (IntegrityError, StaleDataError):
                pass  # two writers raced on one order (shipping added twice, or deleted under an update)

    async def write_one() -> None:
        roll = rng.random()
        async with db.session() as s:
            if roll < 0.4 or len(ids) < 10:
                o = Order(customer_id=rng.choice(customers), amount_cents=rng.randrange(1, 10_000),
                          currency=rng.choice(["EUR", "USD"]))
                if rng.random() < 0.3:
                    o.shipping = OrderShipping(address="1 Test St", carrier="DHL")
                s.add(o)
                await s.flush()
                ids.append(o.id)
            elif roll < 0.75:
                await s.execute(update(Order).where(Order.id == rng.choice(ids))
                                .values(status=rng.choice(["paid", "shipped", "cancelled"]),
                                        amount_cents=rng.randrange(1, 10_000)))
            elif roll < 0.9:
                oid = rng.choice(ids)
                shipping = await s.get(OrderShipping, oid)
                if shipping is None:
                    if await s.get(Order, oid) is not None:
                        s.add(OrderShipping(order_id=oid, address="2 Late Rd", carrier="UPS"))
                else:
                    shipping.tracking_number = f"T{rng.randrange(10**6)}"
            else:
                await s.execute(delete(Order).where(Order.id == rng.choice(ids)))

    await asyncio.gather(*(writer(n // 8) for _ in range(8)))
    return ids


async def caught_up(settings: Settings, group: str, topics: list[str]) -> bool:
    """Whether `group` has committed every partition of `topics` up to its true end offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        tps = [tp for topic in topics for tp in await topic_partitions(consumer, topic)]
        reported = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    ends = await fetched_end_offsets(settings.bootstrap_servers, reported)
    committed: dict[TopicPartition, int] = {}
    for topic in topics:
        for row in await group_offsets(settings, topic):
            if row.group == group:
                committed[TopicPartition(topic, row.partition)] = row.committed
    return all(committed.get(tp, 0) >= end for tp, end in ends.items())


def expected_per_minute(messages: list[Any]) -> dict[int, int]:
    """What `orders_per_minute` must hold for these orders-v2 messages (the chaos checker's rule)."""
    return orders_per_minute(Seen(m.partition, m.offset, m.key, str(m.record["event_id"]), m.record["sequence"],
                                  m.record["data"]) for m in messages if m.record)


async def replay_duplicates(settings: Settings, customers: list[int], at_least: int) -> int:
    """Send a sample of this test's orders-v2 events again, out of order."""
    def mine(ms: list[Any]) -> list[Any]:
        return [m for m in ms if m.record.get("data") and m.record["data"]["customer_id"] in customers]

    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        events = mine(await reader.wait_for(lambda ms: len(mine(ms)) >= at_least, timeout=60))
    sample = random.Random(1).sample(events, min(500, len(events)))
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        for m in sample:
            await producer.send("orders-v2", m.value, key=m.key.encode(), headers=list(m.headers.items()))
        await producer.flush()
    finally:
        await producer.stop()
    return len(sample)


async def test_views_equal_the_database_after_random_writes_and_duplicates(
        view_worker: tuple[str, str], db: Database, settings: Settings) -> None:
    base, view_app_id = view_worker
    customers = [10**9 + random.randrange(10**9) for _ in range(12)]
    created = await random_writes(db, customers, WRITES, seed=3)
    async with db.session() as s:
        rows = (await s.execute(select(Order).where(Order.customer_id.in_(customers)))).scalars().all()
        states = {o.id: o for o in rows}
        shipping = {sh.order_id: sh for sh in (await s.execute(
            select(OrderShipping).where(OrderShipping.order_id.in_(list(states))))).scalars().all()}
    assert await replay_duplicates(settings, customers, len(states)) > 0
    # Compare only once the worker has consumed past the duplicates, in both stages: a view
    # that looks right before they arrive proves nothing about idempotence.
    await until(lambda: caught_up(settings, view_app_id, ["orders-v2"]), timeout=60,
                what="the views' group committed past the duplicates on orders-v2")
    stage2 = [f"{view_app_id}-{name}-updates" for name in ("customer_orders", "orders_by_status", "orders_per_minute")]
    await until(lambda: caught_up(settings, view_app_id, stage2), timeout=60,
                what="the views' group committed past every aggregate update")

    # orders: every live order equals its row; deleted ones are gone.
    async def orders_match() -> bool:
        for oid, o in states.items():
            view = present_state(await table_value(base, "orders", str(oid)) or {})
            want = {"status": o.status, "amount_cents": o.amount_cents, "customer_id": o.customer_id,
                    "shipping": None if oid not in shipping else {
                        "address": shipping[oid].address, "carrier": shipping[oid].carrier,
                        "tracking_number": shipping[oid].tracking_number}}
            if view is None or {k: view[k] for k in want} != want:
                return False
        return True

    assert await orders_match(), "orders view differs from the database"
    deleted = [oid for oid in created if oid not in states]
    assert deleted
    for oid in deleted[:50]:
        stored = await table_value(base, "orders", str(oid))
        assert stored is not None and present_state(stored) is None  # a tombstone, hidden

    # Changelog keys are the raw keys, as on the event topics (recovery and standbys use them).
    async with TopicReader(settings.bootstrap_servers, f"{view_app_id}-orders-changelog", decode=False) as cl:
        keys = {m.key for m in await cl.wait_for(lambda ms: len(ms) > 0)}
    # (Other tests put non-numeric keys such as "valid-…" on orders-v2: only the quoting matters.)
    assert keys and not [k for k in keys if k.startswith('"')], sorted(keys)[:5]

    # customer_orders: count and totals per currency.
    for customer in customers:
        mine = [o for o in states.values() if o.customer_id == customer]
        totals: dict[str, int] = {}
        for o in mine:
            totals[o.currency] = totals.get(o.currency, 0) + o.amount_cents
        want = {"count": len(mine), "total_cents": totals,
                "last_order_at": max(int(o.created_at.timestamp() * 1_000_000) for o in mine)}
        got = CUSTOMER_ORDERS.present(await table_value(base, "customer_orders", str(customer)) or {})
        assert got == want, (customer, got, want)

    # orders_by_status equals the statuses of every order in the `orders` view (checked
    # against the database above; other tests' orders are on the topics only in part).
    counts: dict[str, int] = {}
    after = ""
    while True:
        page = await asyncio.to_thread(fetch, f"{base}/tables/orders/?limit=1000{after}")
        for item in page["items"]:
            counts[item["value"]["status"]] = counts.get(item["value"]["status"], 0) + 1
        if not page.get("next"):
            break
        after = f"&after={page['next']}"
    for status in ("pending", "paid", "shipped", "cancelled"):
        got_count = present_count(await table_value(base, "orders_by_status", status) or {})
        assert got_count == counts.get(status, 0), (status, got_count, counts)

    # orders_per_minute: creations per window (deletes do not uncount them), every window equal
    # to what the topic's events say, this test's creations included.
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        expected = expected_per_minute(await reader.read_to_end())
    async with db.engine.connect() as conn:
        mine = (await conn.execute(text(
            "SELECT (extract(epoch FROM created_at) * 1000000)::bigint FROM orders WHERE id = ANY(:ids)"),
            {"ids": created})).scalars().all()
    assert {ORDERS_PER_MINUTE.start(m) for m in mine} <= set(expected)
    for minute, count in expected.items():
        stored = await table_value(base, "orders_per_minute", str(minute))
        assert present_count(stored or {}) == count, (minute, stored, count)


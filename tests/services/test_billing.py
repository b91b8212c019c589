"""The billing service as users run it (`python -m services billing`), killed with SIGKILL under load.

Orders are written through the ORM and published by the relay while the billing process is
killed and restarted again and again, at random points (between its handler and its database
commit, between that commit and its offset commit). Afterwards every paid order has exactly
one invoice with its amount and currency, no other order has one, nothing was dead-lettered,
and replaying the topic from offset 0 changes nothing.
"""
from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from sqlalchemy import select, text

from app.embedded.broker import EmbeddedBroker
from app.embedded.process import free_port
from app.kafka import topic_partitions
from app.orm import Database
from app.outbox.relay import Relay
from app.settings import Settings
from app.topology import inbox_dead_letter_topic
from chaos.agreement import check_invoices
from models import Order
from services.billing import SERVICE
from tests.processes import listening, spawn_service, stop, wait_for_log
from tests.waiting import until

KILLS = 8


def status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=2) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


async def start_billing(settings: Settings, log: Path, port: int) -> subprocess.Popen[bytes]:
    start = log.stat().st_size if log.exists() else 0
    child = spawn_service(settings, "billing", log=log, BILLING_WEB_PORT=str(port))
    await wait_for_log(log, "billing web server", child, start=start)
    return child


async def write_orders(db: Database, rng: random.Random, ids: list[int], steps: int) -> None:
    """Create, pay, ship, cancel, re-price and delete orders, one ORM transaction per step."""
    for _ in range(steps):
        async with db.session() as s:
            roll = rng.random()
            if roll < 0.35 or not ids:
                order = Order(customer_id=1, amount_cents=rng.randrange(100, 10_000),
                              currency=rng.choice(["EUR", "USD"]))
                s.add(order)
                await s.flush()
                ids.append(order.id)
            else:
                order = (await s.execute(select(Order).where(Order.id == rng.choice(ids)))).scalar_one_or_none()
                if order is None:
                    continue
                if roll < 0.6:
                    order.status = {"pending": "paid", "paid": "shipped"}.get(order.status, order.status)
                elif roll < 0.75:
                    order.amount_cents += 100  # a paid order re-priced: its invoice follows
                elif roll < 0.85:
                    order.status = "cancelled"
                elif roll < 0.9:
                    await s.delete(order)
                else:
                    order.status = "paid"
        await asyncio.sleep(rng.uniform(0, 0.01))


async def invoice_problems(db: Database, ids: list[int]) -> list[str]:
    """Missing, doubled, wrong and unexpected invoices of the orders `ids` (the chaos checker's rules)."""
    async with db.engine.connect() as conn:
        orders = {r.id: r._asdict() for r in (await conn.execute(text(
            "SELECT id, status, amount_cents, currency FROM orders WHERE id = ANY(:ids)"), {"ids": ids})).all()}
        invoices = (await conn.execute(text(
            "SELECT order_id, amount_cents, currency FROM invoices WHERE order_id = ANY(:ids)"), {"ids": ids})).all()
    return check_invoices(orders, [tuple(i) for i in invoices], ids).problems


async def rewind(settings: Settings, group: str, topic: str) -> None:
    """Commit offset 0 for `group` on every partition of `topic` (a replay of the whole topic)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.commit({tp: 0 for tp in tps})
    finally:
        await consumer.stop()


async def dead_letters(settings: Settings, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        ends = await consumer.end_offsets(tps)
        return sum(ends.values())
    finally:
        await consumer.stop()


@pytest.fixture
async def own_broker(settings: Settings, db: Database, tmp_path: Path) -> AsyncIterator[Settings]:
    """A broker of the test's own, with a relay publishing to it: `orders-v2` then holds only
    this test's events (the session's holds other tests' poison and invalid orders)."""
    broker = EmbeddedBroker.start(tmp_path / "broker")
    own = settings.with_(kafka_broker=broker.url)
    relay = Relay(own, standby_poll=0.1)
    task = asyncio.get_running_loop().create_task(relay.run())
    try:
        await until(lambda: relay.stats.active or task.done(), what="relay holds its shards")
        yield own
    finally:
        relay.stop()
        await asyncio.wait_for(task, 20)
        broker.stop()


async def test_billing_killed_at_random_points_under_load_keeps_exactly_one_invoice_per_paid_order(
        own_broker: Settings, db: Database, tmp_path: Path) -> None:
    settings = own_broker
    rng = random.Random(20261204)
    log, port = tmp_path / "billing.log", free_port()
    ids: list[int] = []
    billing = await start_billing(settings, log, port)
    assert listening(billing.pid, port) == {"127.0.0.1"}  # WEB_HOST: loopback unless asked
    writer = asyncio.get_running_loop().create_task(write_orders(db, rng, ids, 600))
    try:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            billing.send_signal(signal.SIGKILL)
            billing.wait()
            billing = await start_billing(settings, log, port)
        await writer
        await until(lambda: invoice_problems(db, ids), lambda p: not p, timeout=60,
                    what="every paid order invoiced once, no other order invoiced")
        assert await dead_letters(settings, inbox_dead_letter_topic("orders-v2", SERVICE)) == 0
        async with db.engine.connect() as conn:
            before = (await conn.execute(text("SELECT id, order_id, amount_cents, currency FROM invoices "
                                              "ORDER BY id"))).all()
        # Replay the whole topic from offset 0: every event is found in the inbox, nothing changes.
        stop(billing)
        await rewind(settings, SERVICE, "orders-v2")
        billing = await start_billing(settings, log, port)
        seen = await until(lambda: status(port), lambda s: s["skipped_duplicate"] > 0 and s["lag"] == 0
                           and len(s["lag_by_partition"]) == settings.topic_partitions,
                           timeout=60, what="the replay read to the end")
        async with db.engine.connect() as conn:
            after = (await conn.execute(text("SELECT id, order_id, amount_cents, currency FROM invoices "
                                             "ORDER BY id"))).all()
        assert after == before and seen["applied"] == 0 and seen["dead_lettered"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
            page = response.read().decode()
        assert "skipped_duplicate" in page and "billing" in page
    finally:
        writer.cancel()
        stop(billing)

"""Dual-publish mode: the relay writes orders-v1 itself, from the same outbox row as orders-v2."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.orm import Database
from app.outbox.relay import Relay
from app.settings import Settings
from app.wire.messages import downconvert
from app.wire.schemas import load
from models import Order, OrderShipping
from tests.kafka import TopicReader
from tests.waiting import until


@pytest.fixture
async def dual_relay(settings: Settings, db: Database) -> AsyncIterator[Relay]:
    """A relay in dual-publish mode for orders v1, switched by setting only (LEGACY_MODES)."""
    relay = Relay(settings.with_(legacy_modes="orders:1=dual-publish"), standby_poll=0.05)
    task = asyncio.get_running_loop().create_task(relay.run())
    # It holds its shards once it has created the topics the readers below subscribe to.
    await until(lambda: relay.stats.active or task.done(), what="relay holds its shards")
    yield relay
    relay.stop()
    await asyncio.wait_for(task, 20)


async def test_dual_publish_sends_v1_identical_to_downconversion(
        dual_relay: Relay, db: Database, settings: Settings) -> None:
    assert dual_relay.dual == {"orders-v2": (1,), "customers-v1": (), "invoices-v1": ()}
    async with db.session() as s:
        order = Order(customer_id=21, amount_cents=250, currency="EUR")
        order.shipping = OrderShipping(address="5 Dock", carrier="DHL")
        s.add(order)
    async with db.session() as s:
        (await s.get(Order, order.id)).status = "paid"  # type: ignore[union-attr]
    key = str(order.id)
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as v2r, \
            TopicReader(settings.bootstrap_servers, "orders-v1") as v1r:
        await v1r.wait_for(lambda ms: len([m for m in ms if m.key == key]) >= 2)
        await v2r.wait_for(lambda ms: len([m for m in ms if m.key == key]) >= 2)
        v2s = v2r.for_keys({key})
        v1s = v1r.for_keys({key})
    assert [m.record["data"]["status"] for m in v1s] == ["pending", "paid"]
    assert v1s[0].record["data"]["amount"] == 2.5 and v1s[0].record["data"]["shipping_address"] == "5 Dock"
    for v1, v2 in zip(v1s, v2s, strict=True):
        value, headers = downconvert(v2.value, load("orders", 2), 1)
        assert (v1.value, list(v1.headers.items())) == (value, headers)
        assert v1.partition == v2.partition  # same key, same partition count

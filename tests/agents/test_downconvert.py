"""orders-v2 -> orders-v1 through a real Faust worker, and dead letters.

(Crash recovery: tests/chaos kills the worker five times under load and checks orders-v1.)"""
from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import update

from app.orm import Database
from app.outbox.relay import Relay, to_messages
from app.settings import Settings
from app.wire.messages import encode_message
from app.wire.schemas import dlq_topic, load
from models import Order, OrderShipping
from tests.kafka import Received, TopicReader
from tests.processes import start_worker, stop


@pytest.fixture(scope="module")
async def worker(settings: Settings, schema: None, tmp_path_factory: pytest.TempPathFactory,
                 ) -> AsyncIterator[tuple[subprocess.Popen[bytes], Path, str]]:
    """A Faust worker in downconvert mode, with a consumer group of its own."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    app_id = f"mse-test-{uuid.uuid4().hex[:8]}"
    child = await start_worker(settings, log, APP_ID=app_id, WEB_PORT=str(free_web_port()))
    yield child, log, app_id
    stop(child)


def free_web_port() -> int:
    from app.embedded.process import free_port
    return free_port()


def v1_of(v2: Received) -> dict[str, object]:
    """The documented conversion of a v2 event's data."""
    data = v2.record["data"]
    if data is None:
        return {}
    return {"id": data["id"], "customer_id": data["customer_id"], "amount": data["amount_cents"] / 100,
            "status": data["status"], "created_at": data["created_at"], "updated_at": data["updated_at"],
            "shipping_address": data["shipping"]["address"] if data["shipping"] else None}


async def test_v1_events_equal_the_documented_conversion_for_every_kind_of_write(
        worker: object, db: Database, relay: Relay, settings: Settings) -> None:
    async with db.session() as s:
        order = Order(customer_id=11, amount_cents=12_345, currency="USD")
        order.shipping = OrderShipping(address="1 Old Rd", carrier="DHL")
        s.add(order)
    async with db.session() as s:
        await s.execute(update(Order).where(Order.id == order.id).values(status="shipped"))
    async with db.session() as s:
        shipping = await s.get(OrderShipping, order.id)
        assert shipping is not None
        shipping.address = "2 New Rd"
    async with db.session() as s:
        await s.delete(await s.get(Order, order.id))
    key = str(order.id)
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as v2_reader, \
            TopicReader(settings.bootstrap_servers, "orders-v1") as v1_reader:
        # Two readers, two consumers: the v1 events can be read before the v2 events they came
        # from, so both are waited for.
        await v1_reader.wait_for(lambda ms: len([m for m in ms if m.key == key]) >= 4)
        await v2_reader.wait_for(lambda ms: len([m for m in ms if m.key == key]) >= 4)
        v2s = {m.record["event_id"]: m for m in v2_reader.for_keys({key})}
        v1s = v1_reader.for_keys({key})
    assert [m.record["op"] for m in v1s] == ["create", "update", "update", "delete"]
    assert [m.record["sequence"] for m in v1s] == [1, 2, 3, 4]
    for v1 in v1s:
        v2 = v2s[v1.record["event_id"]]
        assert v1.record["schema_version"] == 1 and v1.partition == v2.partition
        assert (v1.record["data"] or {}) == v1_of(v2)
        assert v1.headers["ce_id"] == v2.headers["ce_id"]
        assert v1.headers["ce_dataschema"] == b"urn:microservice-events:schemas:orders:v1"
        assert v1.headers["ce_type"] == f"orders.{v1.record['op']}.v1".encode()
    assert v1s[0].record["data"]["amount"] == 123.45
    assert v1s[1].record["data"]["status"] == "shipped"
    assert v1s[2].record["data"]["shipping_address"] == "2 New Rd"


async def test_downconverted_bytes_equal_what_dual_publish_sends(
        worker: object, db: Database, relay: Relay, settings: Settings) -> None:
    async with db.session() as s:
        orders = [Order(customer_id=12, amount_cents=100 + i, currency="EUR") for i in range(5)]
        orders[0].shipping = OrderShipping(address="3 Pier", carrier="UPS", tracking_number="Q")
        s.add_all(orders)
    keys = {str(o.id) for o in orders}
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as v2_reader, \
            TopicReader(settings.bootstrap_servers, "orders-v1") as v1_reader:
        # Both readers hold every key's event before anything is compared: a comparison loop
        # over an empty list would pass without proving anything.
        await v1_reader.wait_for(lambda ms: keys <= {m.key for m in ms})
        await v2_reader.wait_for(lambda ms: keys <= {m.key for m in ms})
        v1s = {m.record["event_id"]: m for m in v1_reader.for_keys(keys)}
        compared = 0
        for v2 in v2_reader.for_keys(keys):
            record = v2.record
            micros = {k: to_micros(record["data"][k]) for k in ("created_at", "updated_at")}
            row = {**record, "topic": "orders-v2", "data": {**record["data"], **micros}}
            [_, dual] = to_messages(row, (1,))
            agent = v1s[record["event_id"]]
            assert (dual.value, dual.headers) == (agent.value, list(agent.headers.items()))
            compared += 1
    assert compared == len(keys)  # one create event per order, each compared byte for byte


def to_micros(ts: datetime) -> int:
    """Epoch microseconds, as the relay's outbox rows hold timestamps."""
    return (ts - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


async def test_poison_messages_go_to_the_dlq_and_valid_events_still_convert(
        worker: tuple[subprocess.Popen[bytes], Path, str], settings: Settings) -> None:
    child, _, _ = worker
    v2 = load("orders", 2)
    run = uuid.uuid4().hex[:8]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
    await producer.start()
    valid_keys, poison_keys = set(), set()
    try:
        for i in range(1000):
            key = f"poison-{run}-{i}"
            poison_keys.add(key)
            await producer.send("orders-v2", poison(v2, i, key), key=key.encode())
            if i % 10 == 0:
                good = f"valid-{run}-{i}"
                valid_keys.add(good)
                value, headers = encode_message(v2, event(good, 100 + i))
                await producer.send("orders-v2", value, key=good.encode(), headers=headers)
        await producer.flush()
    finally:
        await producer.stop()
    async with TopicReader(settings.bootstrap_servers, dlq_topic("orders-v2"), decode=False) as dlq, \
            TopicReader(settings.bootstrap_servers, "orders-v1") as v1:
        await dlq.wait_for(lambda ms: poison_keys <= {m.key for m in ms}, timeout=60)
        await v1.wait_for(lambda ms: valid_keys <= {m.key for m in ms}, timeout=60)
        letters = dlq.for_keys(poison_keys)
        converted = v1.for_keys(valid_keys)
    assert child.poll() is None, "the worker died"
    assert all(m.headers["dlq_error_class"] and m.headers["dlq_error_message"] for m in letters)
    assert all(m.headers["dlq_source_topic"] == b"orders-v2" for m in letters)
    assert {m.headers["dlq_error_class"] for m in letters} >= {b"ConversionError", b"ValueError"}
    assert all(m.record["data"]["amount"] == int(m.key.rsplit("-", 1)[1]) / 100 + 1 for m in converted)
    assert not (poison_keys & {m.key for m in v1.messages})


def event(key: str, cents: int, **envelope: object) -> dict[str, object]:
    now = datetime.now(timezone.utc)
    return {"event_id": str(uuid.uuid4()), "message_version": 1, "schema_version": 2, "service": "test",
            "entity": "orders", "key": key, "op": "create", "occurred_at": now, "sequence": 1,
            "data": {"id": 1, "customer_id": 1, "amount_cents": cents, "currency": "EUR", "status": "paid",
                     "created_at": now, "updated_at": now, "shipping": None}, **envelope}


def poison(v2: object, i: int, key: str) -> bytes:
    """Four kinds: random bytes, truncated Avro, an unknown schema version, unconvertible data."""
    kind = i % 4
    if kind == 0:
        return os.urandom(1 + i % 40)
    if kind == 1:
        value, _ = encode_message(v2, event(key, 1))  # type: ignore[arg-type]
        return value[: len(value) // 2]
    if kind == 2:
        value, _ = encode_message(v2, event(key, 1, schema_version=3))  # type: ignore[arg-type]
        return value
    value, _ = encode_message(v2, event(key, 2**60))  # type: ignore[arg-type]
    return value

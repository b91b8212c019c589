"""Tools nobody here wrote read our events: librdkafka (confluent-kafka) and Apache avro."""
from __future__ import annotations

import asyncio
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from app.orm import Database
from app.outbox.relay import Relay
from app.settings import Settings
from models import Order, OrderShipping
from tests.kafka import apache_decode


def read_with_librdkafka(bootstrap: str, topic: str, key: str, timeout: float = 30) -> tuple[bytes, dict[str, bytes]]:
    """Assign every partition of `topic` from the beginning and return the message with `key`."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "interop-test",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.topics[topic].partitions])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            if msg.key() == key.encode():
                return msg.value(), dict(msg.headers() or [])
        raise AssertionError(f"librdkafka did not see key {key} on {topic}")
    finally:
        consumer.close()


async def test_librdkafka_reads_the_event_and_apache_avro_decodes_it(
        db: Database, relay: Relay, settings: Settings) -> None:
    async with db.session() as s:
        order = Order(customer_id=3, amount_cents=12_345, currency="GBP", status="paid")
        order.shipping = OrderShipping(address="221B Baker St", carrier="Royal Mail", tracking_number="RM1")
        s.add(order)
    value, headers = await asyncio.to_thread(
        read_with_librdkafka, settings.bootstrap_servers, "orders-v2", str(order.id))
    record = apache_decode("orders-v2", value)
    assert record["key"] == str(order.id) and record["op"] == "create"
    assert record["data"]["shipping"] == {"address": "221B Baker St", "carrier": "Royal Mail",
                                          "tracking_number": "RM1"}
    assert headers["ce_id"].decode() == record["event_id"]
    assert headers["ce_type"] == b"orders.create.v2"

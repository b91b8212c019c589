"""A consumer behind on a deep partition still reads it (app/kafka.adapt_fetch_wait).

Tansu lists every record batch of a partition on each fetch, within the fetch's wait; with our
10 ms wait a consumer reading a partition of ~20,000+ single-record batches from the start (a
worker recovering a table's changelog after a takeover) got nothing, for good
(bench/fetch_depth.py). The depth here is past where 10 ms stopped delivering in that bench.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.embedded.broker import EmbeddedBroker
from app.kafka import adapt_fetch_wait

DEPTH = 30_000
TOPIC = "deep"


@pytest.fixture
def deep_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    # A broker of its own: 30,000 batches would slow every other test's fetches on the shared one.
    server = EmbeddedBroker.start(tmp_path / "broker")
    try:
        yield server
    finally:
        server.stop()


async def produce_single_record_batches(bootstrap: str, count: int, producers: int = 8) -> None:
    """`count` records into partition 0, each its own batch (every send awaited before the next)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, 2, 1)])
    finally:
        await admin.close()
    clients = [AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0) for _ in range(producers)]
    for client in clients:
        await client.start()

    async def send(first: int, client: AIOKafkaProducer) -> None:
        for i in range(first, count, producers):
            await client.send_and_wait(TOPIC, b"v", key=b"%d" % i, partition=0)
    try:
        await asyncio.gather(*(send(k, c) for k, c in enumerate(clients)))
    finally:
        for client in clients:
            await client.stop()


async def test_a_consumer_behind_on_30000_batches_reads_them_all(deep_broker: EmbeddedBroker) -> None:
    bootstrap = deep_broker.bootstrap
    await produce_single_record_batches(bootstrap, DEPTH)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    await consumer.start()
    try:
        parts = [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]  # and an empty one beside it
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        read, waits, deadline = 0, set(), time.monotonic() + 90
        while read < DEPTH:
            assert time.monotonic() < deadline, f"read {read} of {DEPTH} in 90 s (waits used: {waits})"
            waits.add(adapt_fetch_wait(consumer, caught_up_ms=10, behind_ms=250))
            batches = await consumer.getmany(*parts, timeout_ms=500)
            read += sum(len(records) for records in batches.values())
        assert read == DEPTH
        assert 250 in waits, "the long wait was never used"
        # Caught up, the consumer goes back to the short wait (latency on idle partitions).
        await consumer.getmany(*parts, timeout_ms=100)
        assert adapt_fetch_wait(consumer, caught_up_ms=10, behind_ms=250) == 10
    finally:
        await consumer.stop()

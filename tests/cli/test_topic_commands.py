"""`topic list` / `topic tail` / `topic consumers` / `topic archive` against the session's embedded
Tansu broker (fresh topics per test)."""
from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import avro.datafile
import avro.io
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.cli.topics import ProgressLine, archive_topic, format_group_offsets, group_offsets
from app.kafka import LAG_CAVEAT, TopicError, ensure_topics, read_to_end, read_until
from app.settings import Settings
from app.wire.messages import encode_message
from app.wire.schemas import load
from tests.processes import run_app
from tests.waiting import until


async def fresh_topic(kafka: Settings, partitions: int = 2) -> str:
    name = f"topictest{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def topic_names(kafka: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def order(i: int) -> dict[str, Any]:
    """An orders v1 event record."""
    at = datetime(2024, 5, 1, 12, 0, i, 1000 * i, tzinfo=UTC)
    return {
        "event_id": str(uuid.uuid4()), "message_version": 1, "schema_version": 1, "service": "orders",
        "entity": "orders", "key": str(i), "op": "create" if i % 3 else "update", "occurred_at": at,
        "sequence": i,
        "data": {"id": i, "customer_id": 7, "amount": i * 1.25, "status": "paid", "created_at": at,
                 "updated_at": at, "shipping_address": None if i % 2 else f"{i} Main St"},
    }


async def produce(kafka: Settings, topic: str, values: list[tuple[bytes, bytes, int]],
                  headers: list[tuple[str, bytes]] | None = None) -> None:
    """(key, value, partition) one by one, each acked."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for key, value, partition in values:
            await producer.send_and_wait(topic, value, key=key, partition=partition, headers=headers)
    finally:
        await producer.stop()


async def produce_orders(kafka: Settings, topic: str, count: int) -> list[dict[str, Any]]:
    records = [order(i) for i in range(count)]
    schema = load("orders", 1)
    messages = []
    for i, record in enumerate(records):
        value, _ = encode_message(schema, record)
        messages.append((record["key"].encode(), value, i % 2))
    await produce(kafka, topic, messages)
    return records


def read_container(path: Path) -> list[dict[str, Any]]:
    """The records of an Avro container file, read by the Apache `avro` package."""
    with avro.datafile.DataFileReader(open(path, "rb"), avro.io.DatumReader()) as reader:
        return [dict(record) for record in reader]  # type: ignore[call-overload]


async def test_consumers_shows_groups_with_committed_offsets_and_their_lag(kafka: Settings) -> None:
    topic = await fresh_topic(kafka)
    await produce(kafka, topic, [(b"k", b"v", 0)] * 5 + [(b"k", b"v", 1)] * 3)
    group, idle = f"{topic}.readers", f"{topic}.idle"
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:  # manual assignment with a group id: commits without a (slow) group join
        consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        await consumer.commit({TopicPartition(topic, 0): 2, TopicPartition(topic, 1): 3})
    finally:
        await consumer.stop()
    other = await fresh_topic(kafka, partitions=1)  # a group with offsets elsewhere only is not listed
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=idle, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(other, 0)])
        await consumer.commit({TopicPartition(other, 0): 0})
    finally:
        await consumer.stop()

    rows = [r for r in await group_offsets(kafka, topic)]
    assert [(r.group, r.partition, r.committed, r.end, r.lag) for r in rows] == [
        (group, 0, 2, 5, 3), (group, 1, 3, 3, 0)]  # single-record batches: Tansu's end offsets are exact
    lines = format_group_offsets(topic, rows)
    assert lines[-1] == LAG_CAVEAT and f"total lag of {group}: 3" in lines

    code, out, err = await run_app(kafka, "topic", "consumers", topic)
    assert code == 0, err
    assert any(line.split() == [group, "0", "2", "5", "3"] for line in out.splitlines()), out
    assert idle not in out and "start of the last batch" in out
    code, out, err = await run_app(kafka, "topic", "consumers", other + "-gone")
    assert code == 1 and "does not exist" in err


async def test_archive_writes_a_container_file_standard_avro_reads(kafka: Settings, tmp_path: Path) -> None:
    topic = await fresh_topic(kafka)
    records = await produce_orders(kafka, topic, 9)
    done = await archive_topic(kafka, topic, tmp_path / "orders.avro", load("orders", 1))
    assert done.count == 9 and not done.deleted
    archived = read_container(tmp_path / "orders.avro")
    assert sorted(archived, key=lambda r: r["sequence"]) == records
    assert list(tmp_path.iterdir()) == [tmp_path / "orders.avro"]  # no partial file left
    assert topic in await topic_names(kafka)


async def test_archive_reads_past_the_end_offsets_to_the_true_end(kafka: Settings, tmp_path: Path) -> None:
    """The tail of partition 0 is one multi-record batch, where Tansu's end offset falls short."""
    topic = await fresh_topic(kafka, partitions=1)
    schema = load("orders", 1)
    records = [order(i) for i in range(8)]
    await produce(kafka, topic, [(r["key"].encode(), encode_message(schema, r)[0], 0) for r in records[:2]])
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        for r in records[2:]:
            assert batch.append(key=r["key"].encode(), value=encode_message(schema, r)[0], timestamp=None)
        await (await producer.send_batch(batch, topic, partition=0))
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
        await consumer.start()
        try:
            reported_end = (await consumer.end_offsets([TopicPartition(topic, 0)]))[TopicPartition(topic, 0)]
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
    done = await archive_topic(kafka, topic, tmp_path / "all.avro", schema)
    assert done.count == 8, f"broker reported end offset {reported_end}"
    assert read_container(tmp_path / "all.avro") == records


async def test_archive_of_a_topic_still_being_written_ends_at_the_offsets_it_started_from(
        kafka: Settings, tmp_path: Path) -> None:
    topic = await fresh_topic(kafka)
    await produce_orders(kafka, topic, 50)
    schema = load("orders", 1)
    written: list[int] = []
    stop = asyncio.Event()

    async def writer() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
        await producer.start()
        try:
            for i in itertools.count(1000):
                if stop.is_set():
                    return
                record = order(i % 60)
                await producer.send_and_wait(topic, encode_message(schema, record)[0], key=b"k", partition=i % 2)
                written.append(i)
        finally:
            await producer.stop()

    task = asyncio.get_running_loop().create_task(writer())
    seen: list[tuple[int, int]] = []
    try:
        await until(lambda: len(written), lambda n: n >= 20, what="the writer writing")
        done = await asyncio.wait_for(archive_topic(kafka, topic, tmp_path / "busy.avro", schema,
                                                    progress=lambda n, total: seen.append((n, total))), 60)
        during = len(written)
        await until(lambda: len(written), lambda n: n > during, what="the writer still writing after the archive")
    finally:
        stop.set()
        await task
    assert 70 <= done.count <= 50 + during
    assert seen and seen[-1] == (done.count, done.count)  # progress reaches the total it announced
    assert len(read_container(tmp_path / "busy.avro")) == done.count


def test_archive_progress_is_one_line_on_stderr_at_most_once_a_second(capsys: pytest.CaptureFixture[str]) -> None:
    line = ProgressLine("orders-v1", every=0)
    line(50, 200)
    line(200, 200)
    assert capsys.readouterr().err.splitlines() == ["archiving orders-v1: 50 of 200 message(s) (25%)",
                                                    "archiving orders-v1: 200 of 200 message(s) (100%)"]
    quiet = ProgressLine("orders-v1", every=3600)
    quiet(1, 2)
    assert capsys.readouterr().err == ""


async def test_archive_command_with_delete_removes_the_topic_after_the_file(kafka: Settings, tmp_path: Path) -> None:
    topic = await fresh_topic(kafka)
    records = await produce_orders(kafka, topic, 4)
    target = tmp_path / "gone.avro"
    code, out, err = await run_app(kafka, "topic", "archive", topic, "--to", str(target),
                                   "--schema", "orders:1", "--delete")
    assert code == 0, err
    assert out.splitlines() == [f"archived 4 message(s) from {topic} to {target}", f"deleted topic {topic}"]
    assert sorted(read_container(target), key=lambda r: r["sequence"]) == records
    assert topic not in await topic_names(kafka)


async def test_archive_stops_on_a_message_that_does_not_decode_and_keeps_the_topic(
        kafka: Settings, tmp_path: Path) -> None:
    topic = await fresh_topic(kafka)
    await produce_orders(kafka, topic, 2)
    await produce(kafka, topic, [(b"bad", b"\xff\xff not avro", 1)])
    with pytest.raises(TopicError, match=r"does not decode as orders v1"):
        await archive_topic(kafka, topic, tmp_path / "x.avro", load("orders", 1), delete=True)
    assert list(tmp_path.iterdir()) == []
    assert topic in await topic_names(kafka)


async def test_archive_without_a_schema_for_the_topic_name_says_so(kafka: Settings, tmp_path: Path) -> None:
    code, _, err = await run_app(kafka, "topic", "archive", "nosuchentity-v1", "--to", str(tmp_path / "x.avro"))
    assert code == 1 and "pass --schema entity:version" in err


class StuckConsumer:
    """Says the end is offset 5 but never returns anything: a broker that stopped serving."""

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 5 for tp in tps}

    async def getmany(self, *tps: TopicPartition, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        await asyncio.sleep(0)
        return {}

    async def position(self, tp: TopicPartition) -> int:
        return 2


async def test_read_until_gives_up_naming_the_partition_when_no_progress_is_made() -> None:
    tp = TopicPartition("stuck", 0)
    with pytest.raises(TopicError, match=r"no progress for 0 s short of the end: stuck\[0\] at 2 < 5"):
        async for _ in read_until(StuckConsumer(), {tp: 5}, fetch_ms=1, stall_seconds=0):  # type: ignore[arg-type]
            pass


async def test_read_to_end_gives_up_naming_the_partition_when_no_progress_is_made() -> None:
    tps = [TopicPartition("stuck", 0)]
    with pytest.raises(TopicError, match=r"no progress for 0 s short of the end: stuck\[0\] at 2 < 5"):
        async for _ in read_to_end(StuckConsumer(), tps, idle_ms=1, stall_seconds=0):  # type: ignore[arg-type]
            pass


async def test_list_shows_each_topic_with_partitions_and_messages_and_hides_the_workers_own(kafka: Settings) -> None:
    topic = await fresh_topic(kafka, partitions=3)
    await produce(kafka, topic, [(b"k", b"v", p) for p in (0, 1, 1)])
    internal = f"{kafka.app_id}-{topic}-changelog"
    await ensure_topics(kafka, [internal])
    code, out, err = await run_app(kafka, "topic", "list")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith(topic + " "))
    assert line.split() == [topic, "3", "partition(s)", "3", "message(s)"]
    assert internal not in out
    code, out, _ = await run_app(kafka, "topic", "list", "--all")
    assert code == 0 and internal in out


async def test_tail_prints_the_last_messages_decoded_with_their_headers_and_stops_at_count(kafka: Settings) -> None:
    topic = await fresh_topic(kafka, partitions=1)
    schema = load("orders", 1)
    records = [order(i) for i in (51, 52, 53)]
    for record in records:
        value, headers = encode_message(schema, record)
        await produce(kafka, topic, [(record["key"].encode(), value, 0)], headers=headers)
    code, out, err = await run_app(kafka, "topic", "tail", topic, "--schema", "orders:1", "--last", "2",
                                   "--count", "2", "--for-seconds", "30")
    assert code == 0, err
    blocks = [block for block in out.split(f"\n{topic}[") if block]
    assert len(blocks) == 2, out
    # The two last, in order: decoded, with their headers.
    assert "key=52" in blocks[0] and "key=53" in blocks[1], out
    assert f'"event_id": "{records[2]["event_id"]}"' in blocks[1] and '"amount": 66.25' in blocks[1]
    assert "  ce_type: " in blocks[1] and "  ce_id: " + records[2]["event_id"] in blocks[1]

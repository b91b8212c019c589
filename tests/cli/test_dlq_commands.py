"""`dlq list` / `dlq redrive` against the session's embedded Tansu broker (fresh topics per test)."""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.cli.dlq import REDRIVEN_FROM, list_dead_letters, redrive, redrive_group
from app.kafka import TopicError, ensure_topics
from app.outbox.relay import dead_letter
from app.settings import Settings
from tests.kafka import TopicReader
from tests.processes import run_app


@pytest.fixture
async def topics(kafka: Settings) -> AsyncIterator[tuple[str, str]]:
    """A fresh source topic `<name>-v2` (2 partitions) and its dead-letter topic `<name>-v2.dlq`."""
    source = f"dlqtest{uuid.uuid4().hex[:8]}-v2"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(source, 2, 1), NewTopic(f"{source}.dlq", 2, 1)])
    finally:
        await admin.close()
    yield source, f"{source}.dlq"


def dead_letter_headers(source: str, partition: int, offset: int, error: str) -> list[tuple[str, bytes]]:
    """What agents/downconvert.py puts on a dead letter, before the original headers."""
    return [("dlq_error_class", b"ConversionError"), ("dlq_error_message", error.encode()),
            ("dlq_source_topic", source.encode()), ("dlq_source_partition", str(partition).encode()),
            ("dlq_source_offset", str(offset).encode())]


async def produce_letters(kafka: Settings, source: str, dlq: str, count: int,
                          first: int = 0) -> list[tuple[bytes, bytes, list[tuple[str, bytes]], int]]:
    """`count` fake dead letters on `dlq`; returns (key, value, original headers, source partition)."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    await producer.start()
    sent = []
    try:
        for i in range(first, first + count):
            key, value, partition = f"k{i}".encode(), f"value-{i}".encode(), i % 2
            original = [("ce_id", f"id-{i}".encode()), ("content-type", b"application/avro")]
            headers = dead_letter_headers(source, partition, 100 + i, f"bad\tamount {i}\nline two") + original
            await producer.send_and_wait(dlq, value, key=key, headers=headers, partition=i % 2)
            sent.append((key, value, original, partition))
    finally:
        await producer.stop()
    return sent


async def test_list_shows_every_letter_with_error_and_source(kafka: Settings, topics: tuple[str, str]) -> None:
    source, dlq = topics
    sent = await produce_letters(kafka, source, dlq, 5)
    letters = await list_dead_letters(kafka, dlq)
    assert sorted(letter.key or b"" for letter, _ in letters) == sorted(key for key, *_ in sent)
    assert not any(redriven for _, redriven in letters)
    letter = next(letter for letter, _ in letters if letter.key == b"k3")
    cells = letter.line().split("\t")
    assert cells == [str(letter.partition), str(letter.offset), "k3", "ConversionError",
                     "bad amount 3 line two", f"{source}:1:103"]
    assert len(await list_dead_letters(kafka, dlq, limit=2)) == 2


async def test_list_command_prints_one_line_per_letter(kafka: Settings, topics: tuple[str, str]) -> None:
    source, dlq = topics
    await produce_letters(kafka, source, dlq, 3)
    code, out, err = await run_app(kafka, "dlq", "list", dlq)
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.startswith("partition\toffset\tkey\terror_class")
    assert sorted(line.split("\t")[2] for line in lines) == ["k0", "k1", "k2"]
    assert all("\tConversionError\t" in line and f"\t{source}:" in line for line in lines)
    code, _, err = await run_app(kafka, "dlq", "list", f"{dlq}-nope")
    assert code == 1 and f"error: topic {dlq}-nope does not exist" in err


async def test_redrive_sends_the_originals_once(kafka: Settings, topics: tuple[str, str]) -> None:
    source, dlq = topics
    sent = await produce_letters(kafka, source, dlq, 4)
    async with TopicReader(kafka.bootstrap_servers, source, decode=False) as reader:
        done = await redrive(kafka, dlq)
        assert len(done) == 4
        received = await reader.wait_for(lambda ms: len(ms) >= 4)
    by_key = {m.key: m for m in received}
    assert len(received) == 4 and set(by_key) == {key.decode() for key, *_ in sent}
    done_by_key = sorted(done, key=lambda d: d.letter.key or b"")
    for (key, value, original, partition), item in zip(sorted(sent), done_by_key, strict=True):
        got = by_key[key.decode()]
        assert got.value == value and got.partition == partition
        assert not any(k.startswith("dlq_") and k != REDRIVEN_FROM for k in got.headers)
        assert got.headers == {**dict(original), REDRIVEN_FROM: item.letter.position.encode()}
    # Everything is committed: a second run sends nothing, and list marks the letters redriven.
    assert await redrive(kafka, dlq) == []
    assert all(redriven for _, redriven in await list_dead_letters(kafka, dlq))
    # Letters that arrive later are redriven by the next run, and only they.
    await produce_letters(kafka, source, dlq, 2, first=10)
    again = await redrive(kafka, dlq)
    assert sorted(item.letter.key or b"" for item in again) == [b"k10", b"k11"]


async def test_redrive_commits_what_it_sent_before_a_letter_it_cannot_redrive(
        kafka: Settings, topics: tuple[str, str]) -> None:
    source, dlq = topics
    await produce_letters(kafka, source, dlq, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    try:  # same partition as k0, after it: the prefix before it must still be committed
        await producer.send_and_wait(dlq, b"x", key=b"orphan", partition=0, headers=[("dlq_error_class", b"E")])
    finally:
        await producer.stop()
    with pytest.raises(TopicError, match=r"has no dlq_source_topic header"):
        await redrive(kafka, dlq)
    letters = {letter.key: redriven for letter, redriven in await list_dead_letters(kafka, dlq)}
    assert letters == {b"k0": True, b"orphan": False}
    assert redrive_group(dlq) == f"{dlq}.redrive"


def outbox_row(row_id: int, key: str, op: str, data: dict[str, Any] | None) -> dict[str, Any]:
    """An orders-v2 outbox row as the relay reads it (asyncpg: UUID, datetime, json as text)."""
    return {"id": row_id, "topic": "orders-v2", "entity": "orders", "schema_version": 2, "key": key,
            "event_id": uuid.uuid4(), "op": op, "service": "orders", "occurred_at": datetime.now(timezone.utc),
            "sequence": 1, "data": None if data is None else json.dumps(data)}


async def test_relay_dead_letters_are_listed_and_redriven_like_the_agents(
        kafka: Settings, topics: tuple[str, str]) -> None:
    _, dlq = topics
    await ensure_topics(kafka, ["orders-v2"])
    key = str(9_500_000_000 + uuid.uuid4().int % 100_000_000)  # a key no other test draws
    # A delete (data null) of a key nobody wrote: redriving it changes no other test's views.
    fixed = outbox_row(41, key, "delete", None)
    still_bad = outbox_row(42, f"{key}-bad", "update", {"id": 1, "amount_cents": "lots"})
    letters = [dead_letter(fixed, ValueError("cannot encode (fixed since)")),
               dead_letter(still_bad, ValueError("cannot encode"))]
    assert all([n for n, _ in letter.headers if n.startswith("dlq_")] ==
               ["dlq_error_class", "dlq_error_message", "dlq_source_topic", "dlq_outbox_id"] for letter in letters)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:  # one partition, in this order: what precedes the bad one must still be committed
        for letter in letters:
            await producer.send_and_wait(dlq, letter.value, key=letter.key, headers=letter.headers, partition=0)
    finally:
        await producer.stop()

    listed = await list_dead_letters(kafka, dlq)
    assert [letter.line().split("\t")[2:] for letter, _ in listed] == [
        [key, "ValueError", "cannot encode (fixed since)", "outbox row 41 for orders-v2"],
        [f"{key}-bad", "ValueError", "cannot encode", "outbox row 42 for orders-v2"]]

    async with TopicReader(kafka.bootstrap_servers, "orders-v2") as reader:
        with pytest.raises(TopicError, match=r"outbox row 42 at .* still cannot be encoded: ValueError"):
            await redrive(kafka, dlq)
        [got] = [m for m in await reader.wait_for(lambda ms: any(m.key == key for m in ms)) if m.key == key]
    # Published as the relay would have: Avro from the .avsc alone, CloudEvents headers, same event id.
    assert (got.record["event_id"], got.record["op"], got.record["data"]) == (str(fixed["event_id"]), "delete", None)
    assert got.headers["ce_id"] == str(fixed["event_id"]).encode()
    assert got.headers[REDRIVEN_FROM] == f"{dlq}:0:{listed[0][0].offset}".encode()
    # Nothing is lost: the row that still cannot be published stays, not redriven, for the next run.
    assert [redriven for _, redriven in await list_dead_letters(kafka, dlq)] == [True, False]

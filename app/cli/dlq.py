"""`python -m app dlq ...`: list the dead letters of a `<topic>.dlq` topic and redrive them.

A dead letter (see `agents/downconvert.py`) is the original message with `dlq_error_class`,
`dlq_error_message`, `dlq_source_topic`, `dlq_source_partition` and `dlq_source_offset`
headers. Redrive sends the original key, value and headers (without the `dlq_*` ones, plus
`dlq_redriven_from: <dlq topic>:<partition>:<offset>`) back to the source topic and partition,
waits for the acks, then commits the position for consumer group `<dlq topic>.redrive`, so the
next redrive starts after it. A crash between ack and commit sends those letters again on the
next run (at-least-once); consumers deduplicate by event id, and the header tells copies apart.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from app.settings import Settings
from app.ops.offsets import TopicError, make_consumer, read_to_end, topic_partitions

Headers = list[tuple[str, bytes]]
DLQ_PREFIX = "dlq_"
REDRIVEN_FROM = "dlq_redriven_from"


class DlqError(TopicError):
    """A dead letter that cannot be redriven, or a DLQ command that cannot go on."""


def redrive_group(dlq_topic: str) -> str:
    """The consumer group whose committed offsets mark how far `dlq_topic` has been redriven."""
    return f"{dlq_topic}.redrive"


@dataclass(frozen=True)
class DeadLetter:
    """One message of a dead-letter topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, message: ConsumerRecord) -> DeadLetter:
        return cls(message.topic, message.partition, message.offset, message.key, message.value,
                   tuple((k, bytes(v)) for k, v in message.headers or ()))

    def header(self, name: str) -> str | None:
        """The first header `name`, decoded (None when absent)."""
        for key, value in self.headers:
            if key == name:
                return value.decode(errors="replace")
        return None

    @property
    def position(self) -> str:
        """`<dlq topic>:<partition>:<offset>`."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def source_topic(self) -> str | None:
        return self.header("dlq_source_topic")

    @property
    def source_partition(self) -> int | None:
        value = self.header("dlq_source_partition")
        return int(value) if value is not None and value.isdigit() else None

    def redrive_headers(self) -> Headers:
        """The original headers: every `dlq_*` header dropped, `dlq_redriven_from` added."""
        kept = [(k, v) for k, v in self.headers if not k.startswith(DLQ_PREFIX)]
        return kept + [(REDRIVEN_FROM, self.position.encode())]

    def line(self, redriven: bool | None = None) -> str:
        """One tab-separated line: partition, offset, key, error class, error message, source
        topic:partition:offset (and, when known, whether it was redriven already)."""
        def clean(text: str | None) -> str:
            return "-" if text is None else re.sub(r"\s+", " ", text).strip()

        source = ":".join(clean(self.header(f"dlq_source_{part}")) for part in ("topic", "partition", "offset"))
        key = None if self.key is None else self.key.decode(errors="replace")
        cells = [str(self.partition), str(self.offset), clean(key), clean(self.header("dlq_error_class")),
                 clean(self.header("dlq_error_message")), source]
        if redriven is not None:
            cells.append("redriven" if redriven else "-")
        return "\t".join(cells)


LIST_HEADER = "partition\toffset\tkey\terror_class\terror_message\tsource\tredrive"


async def list_dead_letters(settings: Settings, dlq_topic: str,
                            limit: int | None = None) -> list[tuple[DeadLetter, bool]]:
    """The dead letters of `dlq_topic` from the beginning (at most `limit`), each with whether
    the redrive group has already committed past it."""
    if limit is not None and limit <= 0:
        return []
    consumer = make_consumer(settings, group_id=redrive_group(dlq_topic))
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, dlq_topic)
        consumer.assign(tps)
        redriven_up_to = {tp: await consumer.committed(tp) or 0 for tp in tps}
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[DeadLetter, bool]] = []
        async with contextlib.aclosing(read_to_end(consumer, tps)) as batches:
            async for batch in batches:
                for message in batch:
                    tp = TopicPartition(message.topic, message.partition)
                    out.append((DeadLetter.of(message), message.offset < redriven_up_to[tp]))
                    if limit is not None and len(out) >= limit:
                        return out
        return out
    finally:
        await consumer.stop()


@dataclass(frozen=True)
class Redriven:
    """A dead letter and where its original went."""

    letter: DeadLetter
    topic: str
    partition: int
    offset: int

    def line(self) -> str:
        return f"{self.letter.position} -> {self.topic}:{self.partition}:{self.offset}"


def redrive_target(letter: DeadLetter, partitions: dict[str, set[int]]) -> tuple[str, int | None]:
    """(source topic, partition) to re-send `letter` to; DlqError when it cannot be redriven.

    The letter goes back to the partition it came from when the source topic still has it, so
    per-key order and placement stay what they were; otherwise the key decides.
    """
    target = letter.source_topic
    if not target:
        raise DlqError(f"{letter.position} has no dlq_source_topic header; cannot redrive it")
    if target == letter.topic:
        raise DlqError(f"{letter.position} names its own dead-letter topic as its source")
    if target not in partitions:
        raise DlqError(f"source topic {target} of {letter.position} does not exist")
    partition = letter.source_partition
    return target, partition if partition in partitions[target] else None


async def redrive(settings: Settings, dlq_topic: str) -> list[Redriven]:
    """Re-send every dead letter of `dlq_topic` not redriven yet; commit after each acked batch.

    A letter that cannot be redriven stops the run with DlqError, after what came before it
    has been sent and committed.
    """
    consumer = make_consumer(settings, group_id=redrive_group(dlq_topic))
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await consumer.start()
    try:
        await producer.start()
        tps = await topic_partitions(consumer, dlq_topic)
        consumer.assign(tps)  # positions: the redrive group's committed offsets, else the beginning
        partitions = {t: consumer.partitions_for_topic(t) or set() for t in await consumer.topics()}
        done: list[Redriven] = []
        async with contextlib.aclosing(read_to_end(consumer, tps)) as batches:
            async for batch in batches:
                letters = [DeadLetter.of(m) for m in batch]
                sendable, problem = _sendable_prefix(letters, partitions)
                done += await _send_and_commit(producer, consumer, sendable)
                if problem is not None:
                    raise problem
        return done
    finally:
        await producer.stop()
        await consumer.stop()


def _sendable_prefix(letters: Sequence[DeadLetter], partitions: dict[str, set[int]]
                     ) -> tuple[list[tuple[DeadLetter, str, int | None]], DlqError | None]:
    """The letters up to the first that cannot be redriven, with their targets; and its error."""
    out = []
    for letter in letters:
        try:
            out.append((letter, *redrive_target(letter, partitions)))
        except DlqError as exc:
            return out, exc
    return out, None


async def _send_and_commit(producer: AIOKafkaProducer, consumer: AIOKafkaConsumer,
                           sendable: list[tuple[DeadLetter, str, int | None]]) -> list[Redriven]:
    """Send in order, wait for every ack, then commit each partition past its last letter."""
    if not sendable:
        return []
    futures = [await producer.send(topic, letter.value, key=letter.key, partition=partition,
                                   headers=letter.redrive_headers())
               for letter, topic, partition in sendable]
    acks = await asyncio.gather(*futures)
    commit = {}
    for letter, _, _ in sendable:  # a batch is ordered by partition, then offset
        commit[TopicPartition(letter.topic, letter.partition)] = letter.offset + 1
    await consumer.commit(commit)
    return [Redriven(letter, ack.topic, ack.partition, ack.offset) for (letter, _, _), ack in zip(sendable, acks, strict=True)]

"""`python -m app dlq ...`: list the dead letters of a dead-letter topic and redrive them.

Every dead letter has the `dlq_*` headers of app/wire/deadletter.py: `dlq_error_class`,
`dlq_error_message`, `dlq_source_topic`, and `dlq_source_partition` + `dlq_source_offset`
(a message an agent consumed, on `<topic>.dlq`) or `dlq_outbox_id` (an outbox row the relay
could not publish, as JSON, on `outbox.dlq`). Redrive sends a consumed message's key, value and
headers (without the `dlq_*` ones) back to the source topic and partition; an outbox row is
encoded again as the relay would (its topic and the versions dual-published from it, the key
choosing the partition). Either way with `dlq_redriven_from: <dlq topic>:<partition>:<offset>`.
It waits for the acks, then commits the position for consumer group `<dlq topic>.redrive`, so
the next redrive starts after it. A crash between ack and commit sends those letters again on
the next run (at-least-once); consumers deduplicate by event id, and the header tells copies apart.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from app.kafka import TopicError, make_consumer, read_to_end, topic_partitions
from app.settings import Settings
from app.wire.deadletter import (
    ERROR_CLASS,
    ERROR_MESSAGE,
    OUTBOX_ID,
    REDRIVEN_FROM,
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    SOURCE_TOPIC,
    outbox_row,
)
from app.wire.deadletter import PREFIX as DLQ_PREFIX
from app.wire.messages import Headers, Outgoing


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
        return self.header(SOURCE_TOPIC)

    @property
    def source_partition(self) -> int | None:
        return self._number(SOURCE_PARTITION)

    @property
    def outbox_id(self) -> int | None:
        """The outbox row id when this letter is a row the relay could not publish."""
        return self._number(OUTBOX_ID)

    def _number(self, name: str) -> int | None:
        value = self.header(name)
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

        if self.outbox_id is not None:
            source = f"outbox row {self.outbox_id} for {clean(self.source_topic)}"
        else:
            source = ":".join(clean(self.header(h)) for h in (SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET))
        key = None if self.key is None else self.key.decode(errors="replace")
        cells = [str(self.partition), str(self.offset), clean(key), clean(self.header(ERROR_CLASS)),
                 clean(self.header(ERROR_MESSAGE)), source]
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
        raise DlqError(f"{letter.position} has no {SOURCE_TOPIC} header; cannot redrive it")
    if target == letter.topic:
        raise DlqError(f"{letter.position} names its own dead-letter topic as its source")
    if target not in partitions:
        raise DlqError(f"source topic {target} of {letter.position} does not exist")
    partition = letter.source_partition
    return target, partition if partition in partitions[target] else None


def redrive_messages(letter: DeadLetter, partitions: dict[str, set[int]], settings: Settings) -> list[Outgoing]:
    """What redrive sends for `letter`; DlqError when it cannot be redriven.

    A consumed message goes back as it was (`redrive_target`). An outbox row is encoded again
    as the relay would now, so a row dead-lettered for a bug since fixed gets published.
    """
    target, partition = redrive_target(letter, partitions)
    if letter.outbox_id is None:
        return [Outgoing(target, letter.key, letter.value, partition, letter.redrive_headers())]
    from app.outbox.relay import to_messages
    from app.registry import load_models
    from app.topology import dual_publish_targets

    load_models(settings)  # their legacy modes say what is dual-published
    try:
        messages = to_messages(outbox_row(letter.value or b"{}"), dual_publish_targets(settings).get(target, ()))
    except Exception as exc:  # whatever stopped the relay stops the redrive: say which row and why
        raise DlqError(f"outbox row {letter.outbox_id} at {letter.position} still cannot be encoded: "
                       f"{type(exc).__name__}: {exc}") from exc
    missing = sorted({m.topic for m in messages} - set(partitions))
    if missing:
        raise DlqError(f"topic {', '.join(missing)} of {letter.position} does not exist")
    redriven = [(REDRIVEN_FROM, letter.position.encode())]
    return [Outgoing(m.topic, m.key, m.value, None, m.headers + redriven) for m in messages]


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
                sendable, problem = _sendable_prefix(letters, partitions, settings)
                done += await _send_and_commit(producer, consumer, sendable)
                if problem is not None:
                    raise problem
        return done
    finally:
        await producer.stop()
        await consumer.stop()


def _sendable_prefix(letters: Sequence[DeadLetter], partitions: dict[str, set[int]], settings: Settings
                     ) -> tuple[list[tuple[DeadLetter, Outgoing]], DlqError | None]:
    """The letters up to the first that cannot be redriven, with what to send; and its error."""
    out = []
    for letter in letters:
        try:
            out += [(letter, message) for message in redrive_messages(letter, partitions, settings)]
        except DlqError as exc:
            return out, exc
    return out, None


async def _send_and_commit(producer: AIOKafkaProducer, consumer: AIOKafkaConsumer,
                           sendable: list[tuple[DeadLetter, Outgoing]]) -> list[Redriven]:
    """Send in order, wait for every ack, then commit each partition past its last letter."""
    if not sendable:
        return []
    futures = [await producer.send(m.topic, m.value, key=m.key, partition=m.partition, headers=m.headers)
               for _, m in sendable]
    acks = await asyncio.gather(*futures)
    commit = {}
    for letter, _ in sendable:  # a batch is ordered by partition, then offset
        commit[TopicPartition(letter.topic, letter.partition)] = letter.offset + 1
    await consumer.commit(commit)
    return [Redriven(letter, ack.topic, ack.partition, ack.offset)
            for (letter, _), ack in zip(sendable, acks, strict=True)]


async def dlq_command(settings: Settings, args: argparse.Namespace) -> int:
    """`dlq list` / `dlq redrive`; a topic or letter problem is one line and exit 1."""
    from aiokafka.errors import KafkaError

    from app.cli.preflight import check_broker

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # keep the output to what was asked
    await check_broker(settings)
    try:
        if args.dlq_command == "list":
            letters = await list_dead_letters(settings, args.topic, args.limit)
            print(LIST_HEADER)
            for letter, redriven in letters:
                print(letter.line(redriven))
            print(f"{len(letters)} dead letter(s) listed from {args.topic}", file=sys.stderr)
        else:
            done = await redrive(settings, args.topic)
            for item in done:
                print(item.line())
            # An outbox row dual-published goes out as more than one message: count letters.
            print(f"redriven {len({item.letter.position for item in done})} dead letter(s) from {args.topic}")
    except (TopicError, KafkaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

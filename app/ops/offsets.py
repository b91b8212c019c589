"""`python -m app topic ...`: consumer groups and their lag on a topic; archive a topic to a file.

Also the helpers the topic and dead-letter commands share: a consumer that reads by manual
assignment (group joins are slow on Tansu) and `read_to_end`, which copes with Tansu's
"latest offset" answer being the start of the last batch rather than the true end.
"""
from __future__ import annotations

import asyncio
import logging
import contextlib
import os
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path

import fastavro
import fastavro.write
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from app.wire.codec import decode
from app.wire.schemas import EventSchema
from app.settings import Settings

log = logging.getLogger(__name__)

#: How long a fetch may return nothing, once the end offsets are reached, before we call it the end.
IDLE_MS = 250
#: How long reading may make no progress while still short of the end offsets.
STALL_SECONDS = 30.0
#: Printed under lag figures: they rest on the broker's end offsets.
LAG_CAVEAT = ("note: end offsets are the broker's \"latest offset\" answers; Tansu answers with the start "
              "of the last batch, so there the end and the lag may be short by up to one batch")


class TopicError(RuntimeError):
    """A topic command cannot go on; the message says why in one line."""


def make_consumer(settings: Settings, group_id: str | None = None) -> AIOKafkaConsumer:
    """A consumer for manual `assign()`: no auto-commit; positions start at the committed offset
    of `group_id` (when given) or at the beginning."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=group_id, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
    )


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=10_000)


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic` (fresh metadata), or TopicError if there is no such topic."""
    await consumer.topics()  # refreshes the metadata of all topics, without auto-creating any
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise TopicError(f"topic {topic} does not exist")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def fetched_end_offsets(bootstrap: str, reported: Mapping[TopicPartition, int], *,
                              timeout: float = 15.0) -> dict[TopicPartition, int]:
    """End offsets corrected by a fetch: the high watermark of a fetch from the reported end.

    Tansu answers ListOffsets(latest) with the start of the partition's last record batch, so
    `end_offsets()` can be short by up to one batch (see LAG_CAVEAT); its fetch responses
    carry the true high watermark. On Kafka both agree and this costs one fetch. A partition
    whose fetch does not answer within `timeout` keeps its reported end.
    """
    ends = {tp: end for tp, end in reported.items() if end is not None}
    if not ends:
        return dict(reported)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    await consumer.start()
    try:
        consumer.assign(list(ends))
        for tp, end in ends.items():
            consumer.seek(tp, end)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = set(ends)
        while pending and loop.time() < deadline:
            await consumer.getmany(*pending, timeout_ms=50, max_records=1)
            for tp in list(pending):
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    ends[tp] = max(ends[tp], highwater)
                    pending.discard(tp)
        if pending:
            log.warning("no fetch answer for %s in %.0f s: keeping the reported end offsets", sorted(pending), timeout)
    finally:
        await consumer.stop()
    return {**reported, **ends}


async def read_to_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition], *, idle_ms: int = IDLE_MS,
                      stall_seconds: float = STALL_SECONDS) -> AsyncGenerator[list[ConsumerRecord], None]:
    """Batches of messages from the consumer's positions in `tps` to the end of each partition.

    The end is reached when every position is at or past the end offsets taken at the start
    *and* a fetch waiting `idle_ms` returns nothing: Tansu's end offsets can stop a batch short
    of the true end, so stopping exactly at them would miss messages. Each batch is ordered by
    partition, then offset.
    """
    ends = await consumer.end_offsets(tps)
    loop = asyncio.get_running_loop()
    last_progress = loop.time()
    while True:
        fetched = await consumer.getmany(*tps, timeout_ms=idle_ms)
        batch = [record for tp in sorted(fetched) for record in fetched[tp]]
        if batch:
            last_progress = loop.time()
            yield batch
            continue
        positions = {tp: await consumer.position(tp) for tp in tps}
        short = [tp for tp in tps if positions[tp] < ends[tp]]
        if not short:
            return
        if loop.time() - last_progress > stall_seconds:
            where = ", ".join(f"{tp.topic}[{tp.partition}] at {positions[tp]} < {ends[tp]}" for tp in short)
            raise TopicError(f"no progress for {stall_seconds:.0f} s short of the end: {where}")


# --------------------------------------------------------------------------------------------
# topic consumers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupOffset:
    """A consumer group's committed offset on one partition, and the partition's end offset."""

    group: str
    partition: int
    committed: int
    end: int

    @property
    def lag(self) -> int:
        """Messages not yet consumed (never negative: the end offset may be short, see LAG_CAVEAT)."""
        return max(self.end - self.committed, 0)


async def group_offsets(settings: Settings, topic: str) -> list[GroupOffset]:
    """Every group with a committed offset on `topic`, per partition, sorted by group and partition.

    Groups come from ListGroups; each group's offsets are fetched for this topic's partitions
    explicitly (Tansu's answer to "all offsets of the group" cannot be decoded by aiokafka).
    """
    consumer, admin = make_consumer(settings), make_admin(settings)
    await consumer.start()
    try:
        await admin.start()
        tps = await topic_partitions(consumer, topic)
        ends = await consumer.end_offsets(tps)
        out = []
        for group in sorted({g[0] for g in await admin.list_consumer_groups()}):
            offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
            out += [GroupOffset(group, tp.partition, meta.offset, ends[tp])
                    for tp, meta in sorted(offsets.items()) if meta.offset >= 0]
        return out
    finally:
        await admin.close()
        await consumer.stop()


def format_group_offsets(topic: str, rows: list[GroupOffset]) -> list[str]:
    """The `topic consumers` output: a table and the lag caveat."""
    if not rows:
        return [f"no consumer group has committed offsets on {topic}"]
    table = [("group", "partition", "committed", "end", "lag")]
    table += [(r.group, str(r.partition), str(r.committed), str(r.end), str(r.lag)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]
    totals: dict[str, int] = {}
    for r in rows:
        totals[r.group] = totals.get(r.group, 0) + r.lag
    lines += [f"total lag of {group}: {lag}" for group, lag in totals.items()]
    return lines + [LAG_CAVEAT]


# --------------------------------------------------------------------------------------------
# topic archive
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Archived:
    """What `archive_topic` did."""

    topic: str
    path: Path
    count: int
    deleted: bool


async def archive_topic(settings: Settings, topic: str, path: Path, schema: EventSchema,
                        delete: bool = False) -> Archived:
    """Write every message of `topic` (decoded with `schema`) to an Avro container file at `path`.

    The file's schema is the topic's `.avsc`, so any Avro library reads it. The file is written
    to `<path>.partial`, re-read, and renamed only when the count matches. With `delete`, the
    topic is deleted after that, unless messages arrived meanwhile.
    """
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        partial = path.with_name(path.name + ".partial")
        try:
            count = await _write_archive(consumer, tps, partial, schema)
            reread = _count_records(partial)
            if reread != count:
                raise TopicError(f"{partial} holds {reread} records after writing {count}; not archived")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        if not delete:
            return Archived(topic, path, count, False)
        async with contextlib.aclosing(read_to_end(consumer, tps)) as more:
            late = sum([len(batch) async for batch in more])
        if late:
            raise TopicError(f"{late} message(s) arrived on {topic} during the archive; {path} holds the "
                             f"first {count}; the topic was NOT deleted (stop its producers and run again)")
    finally:
        await consumer.stop()
    admin = make_admin(settings)
    await admin.start()
    try:
        await delete_topics(admin, [topic])
    finally:
        await admin.close()
    return Archived(topic, path, count, True)


async def _write_archive(consumer: AIOKafkaConsumer, tps: list[TopicPartition], path: Path,
                         schema: EventSchema) -> int:
    """Decode every message to the end into a deflate-compressed container file; the count."""
    count = 0
    with open(path, "wb") as out:
        writer = fastavro.write.Writer(out, schema.raw, codec="deflate")  # header = the .avsc as is
        async with contextlib.aclosing(read_to_end(consumer, tps)) as batches:
            async for batch in batches:
                for message in batch:
                    try:
                        record = decode(schema, message.value)
                    except Exception as exc:  # name the message; an archive never skips one
                        raise TopicError(f"{message.topic}[{message.partition}]@{message.offset} does not decode "
                                         f"as {schema.entity} v{schema.version}: {type(exc).__name__}: {exc}; "
                                         f"nothing archived") from None
                    writer.write(record)
                    count += 1
        writer.flush()
        out.flush()
        os.fsync(out.fileno())
    return count


def _count_records(path: Path) -> int:
    """Records in a container file, reading (and so checking) every block."""
    with open(path, "rb") as f:
        return sum(1 for _ in fastavro.reader(f))


async def delete_topics(admin: AIOKafkaAdminClient, topics: list[str]) -> None:
    """Delete `topics` with a started admin client; TopicError naming the first the broker refused."""
    from aiokafka.errors import for_code

    if not topics:
        return
    response = await admin.delete_topics(topics)
    for name, code, *_ in response.topic_error_codes:
        if code:
            raise TopicError(f"the broker did not delete topic {name}: {for_code(code).__name__}")

"""`python -m app topic ...`: consumer groups and their lag on a topic; archive a topic to a file."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fastavro
import fastavro.write
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from app.cli.preflight import check_broker
from app.kafka import (LAG_CAVEAT, TopicError, delete_topics, fetched_end_offsets, make_admin, make_consumer,
                       read_until, topic_partitions)
from app.settings import Settings
from app.wire.codec import decode, schema_for_topic
from app.wire.schemas import EventSchema, load


async def topic_command(settings: Settings, args: argparse.Namespace) -> int:
    """`topic consumers` / `topic archive`; a topic problem is one line and exit 1."""
    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # keep the output to what was asked
    await check_broker(settings)
    try:
        if args.topic_command == "consumers":
            for line in format_group_offsets(args.topic, await group_offsets(settings, args.topic)):
                print(line)
            return 0
        schema = archive_schema(args.topic, args.schema)
        done = await archive_topic(settings, args.topic, Path(args.to), schema, delete=args.delete,
                                   progress=ProgressLine(args.topic))
        print(f"archived {done.count} message(s) from {done.topic} to {done.path}")
        if done.deleted:
            print(f"deleted topic {done.topic}")
    except (TopicError, KafkaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


class ProgressLine:
    """Prints `archiving <topic>: N of M message(s) (P%)` to stderr, at most once a second."""

    def __init__(self, topic: str, every: float = 1.0) -> None:
        self.topic, self.every = topic, every
        self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            print(f"archiving {self.topic}: {done} of {total} message(s){share}", file=sys.stderr, flush=True)


def archive_schema(topic: str, override: str | None) -> EventSchema:
    """The schema to decode `topic` with: `entity:version` when given, else from `<entity>-v<N>`."""
    try:
        if override:
            entity, _, version = override.partition(":")
            return load(entity, int(version.removeprefix("v")))
        return schema_for_topic(topic)
    except (LookupError, ValueError) as exc:
        hint = "" if override else "; pass --schema entity:version"
        raise TopicError(f"no schema for topic {topic}: {exc}{hint}") from None


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


@dataclass(frozen=True)
class Archived:
    """What `archive_topic` did."""

    topic: str
    path: Path
    count: int
    deleted: bool


#: Called with (messages written, messages to write) as an archive goes.
Progress = Callable[[int, int], None]


async def archive_topic(settings: Settings, topic: str, path: Path, schema: EventSchema,
                        delete: bool = False, progress: Progress | None = None) -> Archived:
    """Write every message of `topic` up to its end offsets at the start (decoded with `schema`)
    to an Avro container file at `path`.

    The end is fixed when the archive starts, so a topic still being written is archived up to
    that point and the command ends. The file's schema is the topic's `.avsc`, so any Avro
    library reads it. The file is written to `<path>.partial`, re-read, and renamed only when
    the count matches. With `delete`, the topic is deleted after that, unless messages arrived
    meanwhile.
    """
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        starts = {tp: await consumer.position(tp) for tp in tps}
        ends = await true_ends(settings, consumer, tps)
        total = sum(max(0, ends[tp] - starts[tp]) for tp in tps)
        partial = path.with_name(path.name + ".partial")
        try:
            count = await _write_archive(consumer, ends, partial, schema, total, progress)
            reread = _count_records(partial)
            if reread != count:
                raise TopicError(f"{partial} holds {reread} records after writing {count}; not archived")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        if not delete:
            return Archived(topic, path, count, False)
        now = await true_ends(settings, consumer, tps)
        late = sum(max(0, now[tp] - ends[tp]) for tp in tps)
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


async def true_ends(settings: Settings, consumer: AIOKafkaConsumer,
                    tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """Each partition's end offset now, corrected by a fetch (Tansu reports them short)."""
    reported = await consumer.end_offsets(tps)
    return {tp: int(end) for tp, end in (await fetched_end_offsets(settings.bootstrap_servers, reported)).items()}


async def _write_archive(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int], path: Path,
                         schema: EventSchema, total: int, progress: Progress | None) -> int:
    """Decode every message up to `ends` into a deflate-compressed container file; the count."""
    count = 0
    with open(path, "wb") as out:
        writer = fastavro.write.Writer(out, schema.raw, codec="deflate")  # header = the .avsc as is
        async with contextlib.aclosing(read_until(consumer, ends)) as batches:
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
                if progress is not None:
                    progress(count, total)
        writer.flush()
        out.flush()
        os.fsync(out.fileno())
    return count


def _count_records(path: Path) -> int:
    """Records in a container file, reading (and so checking) every block."""
    with open(path, "rb") as f:
        return sum(1 for _ in fastavro.reader(f))

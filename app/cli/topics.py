"""`python -m app topic ...`: list topics, tail one decoded, consumer groups and their lag on a
topic, archive a topic to a file."""
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
from typing import Any

import fastavro
import fastavro.write
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from app.cli.preflight import check_broker
from app.cli.progress import Throttled
from app.kafka import (
    LAG_CAVEAT,
    TopicError,
    delete_topics,
    fetched_end_offsets,
    make_admin,
    make_consumer,
    read_until,
    topic_partitions,
)
from app.settings import Settings
from app.wire.messages import decode, schema_for_topic
from app.wire.schemas import EventSchema, load


async def topic_command(settings: Settings, args: argparse.Namespace) -> int:
    """`topic consumers` / `topic archive`; a topic problem is one line and exit 1."""
    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # keep the output to what was asked
    await check_broker(settings)
    try:
        if args.topic_command == "list":
            for line in format_topic_list(await topic_list(settings, internal=args.all)):
                print(line)
            return 0
        if args.topic_command == "tail":
            schema = archive_schema(args.topic, args.schema) if args.schema else None
            await tail_topic(settings, args.topic, from_start=args.from_start, last=args.last,
                             count=args.count, for_seconds=args.for_seconds, schema=schema)
            return 0
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


@dataclass(frozen=True)
class TopicSize:
    """A topic's partitions and messages (the sum of its true end offsets: what was ever written,
    retention aside)."""

    topic: str
    partitions: int
    messages: int


async def topic_list(settings: Settings, *, internal: bool = False) -> list[TopicSize]:
    """Every topic with its partitions and messages; the worker's internal topics (changelogs,
    repartition topics: `<app id>-…`) only with `internal`."""
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        names = sorted(t for t in await consumer.topics() if not t.startswith("__")  # one metadata fetch
                       and (internal or not t.startswith(f"{settings.app_id}-")))
        tps = {t: [TopicPartition(t, p) for p in sorted(consumer.partitions_for_topic(t) or ())] for t in names}
        reported = await consumer.end_offsets([tp for parts in tps.values() for tp in parts]) if tps else {}
        ends = await fetched_end_offsets(settings.bootstrap_servers, reported)
    finally:
        await consumer.stop()
    return [TopicSize(t, len(parts), sum(ends.get(tp, 0) for tp in parts)) for t, parts in tps.items()]


def format_topic_list(rows: list[TopicSize]) -> list[str]:
    if not rows:
        return ["no topics"]
    width = max(len(r.topic) for r in rows)
    return [f"{r.topic:<{width}}  {r.partitions:>3} partition(s)  {r.messages:>10,} message(s)" for r in rows]


def describe(topic: str, value: bytes | None, schema: EventSchema | None = None) -> str:
    """A message value as a user debugging reads it: the decoded event (JSON) on an event topic
    (or with `schema`), else JSON or text as sent, else the bytes' repr."""
    import json

    if value is None:
        return "null (tombstone)"
    with contextlib.suppress(Exception):  # not an event topic, or not an event: shown as it is below
        record = decode(schema or schema_for_topic(topic), value)
        return json.dumps(record, default=str, sort_keys=False)
    with contextlib.suppress(ValueError):
        return json.dumps(json.loads(value))
    with contextlib.suppress(UnicodeDecodeError):
        return value.decode()
    return repr(value)


def format_message(msg: Any, schema: EventSchema | None = None) -> str:
    """`topic[partition]@offset key=… time=…` then the headers, then the value, on one line each."""
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(msg.timestamp / 1000, UTC).isoformat(timespec="milliseconds")
    key = msg.key.decode(errors="replace") if msg.key is not None else None
    lines = [f"{msg.topic}[{msg.partition}]@{msg.offset} key={key} time={when}"]
    for name, raw in msg.headers or ():
        lines.append(f"  {name}: {raw.decode(errors='replace') if raw is not None else None}")
    lines.append(f"  {describe(msg.topic, msg.value, schema)}")
    return "\n".join(lines)


async def tail_topic(settings: Settings, topic: str, *, from_start: bool = False, last: int = 10,
                     count: int = 0, for_seconds: float = 0.0, schema: EventSchema | None = None) -> int:
    """Print the last `last` messages of each partition (every message with `from_start`), then
    new ones as they come, until `count` were printed or `for_seconds` passed (0: Ctrl-C)."""
    consumer = make_consumer(settings)
    await consumer.start()
    printed = 0
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        if from_start:
            await consumer.seek_to_beginning(*tps)
        else:
            ends = await fetched_end_offsets(settings.bootstrap_servers, await consumer.end_offsets(tps))
            for tp in tps:
                consumer.seek(tp, max(0, ends.get(tp, 0) - last))
        deadline = time.monotonic() + for_seconds if for_seconds > 0 else None
        while deadline is None or time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for msg in sorted((m for msgs in batch.values() for m in msgs), key=lambda m: (m.timestamp, m.partition)):
                print(format_message(msg, schema), flush=True)
                printed += 1
                if count and printed >= count:
                    return printed
    finally:
        await consumer.stop()
    return printed


class ProgressLine:
    """Prints `archiving <topic>: N of M message(s) (P%)` to stderr, at most once a second."""

    def __init__(self, topic: str, every: float = 1.0) -> None:
        self.topic = topic
        self.line = Throttled(every)

    def __call__(self, done: int, total: int) -> None:
        share = f" ({100 * done / total:.0f}%)" if total else ""
        self.line.print(f"archiving {self.topic}: {done} of {total} message(s){share}")


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
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
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

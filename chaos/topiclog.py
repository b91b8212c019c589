"""Every message of a topic from the beginning, decoded, read in the background."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from app.wire.messages import decode, schema_for_topic


@dataclass(frozen=True)
class Seen:
    """One decoded event message."""

    partition: int
    offset: int
    key: str
    event_id: str
    sequence: int
    data: dict[str, Any] | None


#: Raises on a decoded record its consumers would dead-letter.
Validate = Callable[[dict[str, Any]], object]


class TopicLog:
    """Every message of a topic from the beginning, read in the background.

    `validate`: a decoded record it raises on is poison too, like one that does not decode.
    """

    def __init__(self, bootstrap: str, topic: str, *, decode_events: bool = True,
                 validate: Validate | None = None) -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        self.decode_events = decode_events
        self.validate = validate
        self.events: list[Seen] = []
        self.undecodable = 0
        self.invalid = 0
        self.errors: list[str] = []  # fetch errors (retried)
        # Offsets skipped between two messages read: the topics are neither compacted nor
        # transactional, so a gap is the reader's (an event "lost" there may not be).
        self.gaps: list[str] = []
        self.messages = 0
        self._next_offset: dict[int, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> TopicLog:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="earliest", fetch_max_wait_ms=10)
        await self._consumer.start()
        partitions: set[int] | None = None
        for _ in range(100):
            await self._consumer.topics()
            partitions = self._consumer.partitions_for_topic(self.topic)
            if partitions:
                break
            await asyncio.sleep(0.1)
        if not partitions:
            raise RuntimeError(f"topic {self.topic} has no partitions")
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._consumer is not None
        schema = schema_for_topic(self.topic) if self.decode_events else None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=100)
            except KafkaError as exc:
                # A fetch error must not end the reading (that would look like lost events):
                # note it and fetch again from the same positions, as any consumer would.
                self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
                continue
            for tp, messages in batch.items():
                for m in messages:
                    self.messages += 1
                    expected = self._next_offset.get(tp.partition, m.offset)
                    if m.offset != expected:
                        self.gaps.append(f"partition {tp.partition} offsets {expected}..{m.offset - 1}")
                    self._next_offset[tp.partition] = m.offset + 1
                    if schema is None:
                        continue
                    try:
                        record = decode(schema, m.value or b"")
                    except Exception:  # poison: counted, never a logical event
                        self.undecodable += 1
                        continue
                    if self.validate is not None:
                        try:
                            self.validate(record)
                        except Exception:
                            self.invalid += 1
                            continue
                    self.events.append(Seen(tp.partition, m.offset, (m.key or b"").decode(errors="replace"),
                                            str(record["event_id"]), record["sequence"], record["data"]))

    def alive(self) -> None:
        """Raise what ended the background reading, if it ended."""
        if self._task is not None and self._task.done():
            raise RuntimeError(f"reading {self.topic} stopped") from self._task.exception()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._consumer is not None:
            await self._consumer.stop()


async def count_messages(bootstrap: str, topic: str, *, at_least: int, timeout: float = 30.0) -> int:
    """Messages on `topic`, once there are `at_least` (or `timeout` has passed)."""
    log = TopicLog(bootstrap, topic, decode_events=False)
    await log.start()
    try:
        deadline = time.monotonic() + timeout
        while log.messages < at_least and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return log.messages
    finally:
        await log.stop()

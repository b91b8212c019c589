"""Test helpers that read topics with aiokafka (manual assign: group joins are slow on Tansu)."""
from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import avro.io
import avro.schema
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.waiting import POLL

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


@dataclass
class Received:
    """One message as read from the broker, decoded with the Apache `avro` package."""

    topic: str
    partition: int
    offset: int
    key: str
    headers: dict[str, bytes]
    value: bytes
    record: dict[str, Any]
    received_at: float


def apache_decode(topic: str, value: bytes) -> dict[str, Any]:
    """Decode with the Apache `avro` package from the `.avsc` file alone (interop proof)."""
    entity, _, version = topic.rpartition("-v")
    schema = avro.schema.parse((SCHEMAS / entity / f"v{version}.avsc").read_text())
    return avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(value)))  # type: ignore[no-any-return]


class TopicReader:
    """Reads every partition of a topic from the beginning, in the background."""

    def __init__(self, bootstrap: str, topic: str, *, decode: bool = True) -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        self.decode = decode
        self.messages: list[Received] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "TopicReader":
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False,
            fetch_max_wait_ms=5, auto_offset_reset="earliest",
        )
        await self._consumer.start()
        try:
            partitions = await self._partitions()
        except BaseException:
            await self._consumer.stop()
            raise
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _partitions(self) -> set[int]:
        assert self._consumer is not None
        deadline = time.monotonic() + 10
        while True:
            await self._consumer.topics()  # refreshes cluster metadata
            partitions = self._consumer.partitions_for_topic(self.topic)
            if partitions:
                return partitions
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {self.topic} does not exist")
            await asyncio.sleep(POLL)

    def _decode(self, value: bytes | None) -> dict[str, Any]:
        """The decoded record; {} for a message that is not ours (other tests send poison)."""
        if not self.decode or value is None:
            return {}
        try:
            return apache_decode(self.topic, value)
        except Exception:
            return {}

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=50)
            now = time.monotonic()
            for tp, msgs in batch.items():
                for m in msgs:
                    record = self._decode(m.value)
                    self.messages.append(Received(
                        tp.topic, tp.partition, m.offset, (m.key or b"").decode(),
                        dict(m.headers or ()), m.value, record, now))
            if batch:
                self._changed.set()

    async def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0) -> list[Received]:
        """Wait until `predicate(messages)` holds; fail with what was seen on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out on {self.topic}; {len(self.messages)} messages seen")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        return self.messages

    async def read_to_end(self, timeout: float = 30.0) -> list[Received]:
        """Every message up to the topic's end offsets as of now (corrected for Tansu's short ones)."""
        from app.kafka import fetched_end_offsets

        assert self._consumer is not None
        tps = list(self._consumer.assignment())
        ends = await fetched_end_offsets(self.bootstrap, await self._consumer.end_offsets(tps))

        def done(messages: list[Received]) -> bool:
            last: dict[int, int] = {}
            for m in messages:
                last[m.partition] = max(last.get(m.partition, -1), m.offset)
            return all(last.get(tp.partition, -1) >= end - 1 for tp, end in ends.items())

        return await self.wait_for(done, timeout)

    def for_keys(self, keys: set[str]) -> list[Received]:
        """The messages whose Kafka key is in `keys`."""
        return [m for m in self.messages if m.key in keys]

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._consumer is not None:
            await self._consumer.stop()

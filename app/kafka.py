"""Kafka clients the commands and the transport share.

A consumer that reads by manual assignment (group joins are slow on Tansu), an admin client,
`read_to_end` and `fetched_end_offsets`, which cope with Tansu's "latest offset" answer being
the start of the last batch rather than the true end, and `delete_topics`.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.errors import EventsError
from app.faust_compat import fetch_states, set_fetcher_wait
from app.settings import Settings

log = logging.getLogger(__name__)

#: How long a fetch may return nothing, once the end offsets are reached, before we call it the end.
IDLE_MS = 250
#: How long reading may make no progress while still short of the end offsets.
STALL_SECONDS = 30.0
#: Printed under lag figures: they rest on the broker's end offsets.
LAG_CAVEAT = ("note: end offsets are the broker's \"latest offset\" answers; Tansu answers with the start "
              "of the last batch, so there the end and the lag may be short by up to one batch")


class TopicError(EventsError, RuntimeError):
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
    # Bounded as a whole, start and stop included: Faust's table recovery awaits this, and a
    # recovery step that outlasts `broker_request_timeout` ends its loop for good.
    try:
        return {**reported, **await asyncio.wait_for(_fetched_ends(bootstrap, ends, timeout), timeout + 10)}
    except asyncio.TimeoutError:
        log.warning("no answer for the end offsets of %s in %.0f s: keeping the reported ones",
                    sorted(ends), timeout + 10)
        return dict(reported)


async def _fetched_ends(bootstrap: str, ends: dict[TopicPartition, int], timeout: float) -> dict[TopicPartition, int]:
    """`ends`, raised to the high watermark a fetch from each reports (see fetched_end_offsets)."""
    ends = dict(ends)
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
    return ends


def adapt_fetch_wait(consumer: AIOKafkaConsumer, caught_up_ms: int, behind_ms: int) -> int:
    """Set the consumer's fetch wait from where it stands: `behind_ms` while a partition it
    fetches is known to hold records past its position (and past what it fetched already),
    `caught_up_ms` once none does.

    Tansu lists every record batch of a partition on each fetch and stops listing when the
    fetch's wait runs out, so a consumer behind on a partition of ~20,000+ small batches got
    nothing with a 10 ms wait, for good (bench/fetch_depth.py: 10 ms stalls from 20,000-30,000
    batches, 100 ms still delivers at 50,000). A wait costs latency only on partitions with
    nothing to read (Tansu answers as soon as a check finds data), so the long one is kept for
    consumers with something to read. Returns the wait set. Call it on the consumer's loop.
    """
    try:
        states = fetch_states(consumer)
    except RuntimeError:  # changed while read: keep the current wait
        return -1
    # A partition whose fetched records wait to be taken is behind only until they are.
    behind = any(not s.paused and not s.buffered and s.highwater is not None and s.position is not None
                 and s.position < s.highwater for s in states.values())
    wait = behind_ms if behind else caught_up_ms
    set_fetcher_wait(consumer, wait)
    return wait


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


async def read_until(consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int], *, fetch_ms: int = IDLE_MS,
                     stall_seconds: float = STALL_SECONDS) -> AsyncGenerator[list[ConsumerRecord], None]:
    """Batches of messages from the consumer's positions up to (not including) `ends`.

    A fixed stopping point, unlike `read_to_end`: a topic still being written ends too, and
    what arrives meanwhile is left for the next reader. Take `ends` from
    `fetched_end_offsets` (Tansu's reported ends are short). Each batch is ordered by
    partition, then offset.
    """
    loop = asyncio.get_running_loop()
    last_progress = loop.time()
    while True:
        positions = {tp: await consumer.position(tp) for tp in ends}
        short = [tp for tp in ends if positions[tp] < ends[tp]]
        if not short:
            return
        fetched = await consumer.getmany(*short, timeout_ms=fetch_ms)
        if any(fetched.values()):
            last_progress = loop.time()
            batch = [record for tp in sorted(fetched) for record in fetched[tp] if record.offset < ends[tp]]
            if batch:
                yield batch
            continue
        if loop.time() - last_progress > stall_seconds:
            where = ", ".join(f"{tp.topic}[{tp.partition}] at {positions[tp]} < {ends[tp]}" for tp in short)
            raise TopicError(f"no progress for {stall_seconds:.0f} s short of the end: {where}")


async def ensure_topics(settings: Settings, topics: list[str]) -> None:
    """Create missing topics with the configured partition count (auto-create would pick its own)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                await admin.create_topics([NewTopic(t, settings.topic_partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass  # another worker created it first
    finally:
        await admin.close()


async def delete_topics(admin: AIOKafkaAdminClient, topics: list[str]) -> None:
    """Delete `topics` with a started admin client; TopicError naming the first the broker refused."""
    from aiokafka.errors import for_code

    if not topics:
        return
    response = await admin.delete_topics(topics)
    for name, code, *_ in response.topic_error_codes:
        if code:
            raise TopicError(f"the broker did not delete topic {name}: {for_code(code).__name__}")

"""`python -m app replay`: rebuild the views and the cache from the event topics.

Run it with every worker of the app stopped. It deletes the views' changelog and repartition
topics (the tables' only durable state besides RocksDB files, which must be removed with
them), rewinds the app's consumer group to the start of the event topics, and deletes the
cached entities from Redis. The next worker start replays every event; since views and
cache apply events by sequence, the result equals what incremental processing built.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from app.settings import Settings

VIEW_TABLES = ("orders", "customer_orders", "orders_by_status", "orders_per_minute")


@dataclass
class ReplayPlan:
    """What a replay resets (pure: computed from the settings and the topic list)."""

    delete_topics: list[str]
    rewind_topics: list[str]


def plan(settings: Settings, existing: set[str]) -> ReplayPlan:
    """The topics to delete and to rewind for `settings.app_id`."""
    import models  # noqa: F401
    from app.orm import EventedBase
    from app.schemas import topic_name

    derived = [f"{settings.app_id}-{t}-{kind}" for t in VIEW_TABLES for kind in ("changelog", "updates")]
    sources = [topic_name(m.class_.__entity__, m.class_.__schema_version__)
               for m in EventedBase.registry.mappers if m.class_.__extends__ is None]
    return ReplayPlan([t for t in derived if t in existing], [t for t in sources if t in existing])


async def _commit_when_group_empty(consumer: Any, offsets: dict[TopicPartition, int],
                                   timeout: float = 60.0) -> None:
    """Commit `offsets` for the group; the broker refuses while a stopped worker's membership
    has not expired yet (up to the session timeout), so retry until it is empty."""
    from aiokafka.errors import CommitFailedError, IllegalGenerationError, RebalanceInProgressError
    from aiokafka.errors import UnknownMemberIdError

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await consumer.commit(offsets)
            return
        except (CommitFailedError, IllegalGenerationError, RebalanceInProgressError, UnknownMemberIdError):
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("the consumer group still has members: stop every worker first") from None
            await asyncio.sleep(1.0)


async def replay(settings: Settings) -> list[str]:
    """Reset views and cache so the next worker start rebuilds them; returns what it did."""
    from app.topics import delete_topic, make_admin, make_consumer, topic_partitions

    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    todo = plan(settings, existing)
    done = []
    for topic in todo.delete_topics:
        await delete_topic(settings, topic)
        done.append(f"deleted {topic}")
    consumer = make_consumer(settings, group_id=settings.app_id)
    await consumer.start()
    try:
        for topic in todo.rewind_topics:
            tps = await topic_partitions(consumer, topic)
            consumer.assign(tps)
            await _commit_when_group_empty(consumer, {TopicPartition(tp.topic, tp.partition): 0 for tp in tps})
            done.append(f"rewound group {settings.app_id} on {topic} to offset 0")
    finally:
        await consumer.stop()
    if settings.redis_url:
        from redis.asyncio import Redis

        redis = Redis.from_url(settings.redis_url)
        try:
            removed = 0
            async for key in redis.scan_iter(match="entity:*", count=1000):
                removed += await redis.delete(key)
        finally:
            await redis.aclose()
        done.append(f"deleted {removed} cached entities")
    return done

"""`python -m app replay`: make the next worker start rebuild its views and the cache from the topics.

With every worker stopped, replay
1. deletes the workers' consumer group, so the agents read every event topic from offset 0
   (`CONSUMER_AUTO_OFFSET_RESET=earliest`); a group that still has members is refused;
2. deletes the views' changelog and repartition topics (`<app id>-*-changelog`, `-updates`),
   so no table recovers its old state (Faust creates them again at start);
3. deletes the local table stores under the worker's data directory (`FAUST_DATA_DIR`);
   workers on other machines must be started with an empty data directory too;
4. deletes every cached entity from Redis; readers fall back to the database until the
   refresh agent has written the entity again.

Why a group delete and not an offset reset: Tansu keeps a stopped member in the group and
silently ignores offset commits from outside it; DeleteGroups works on Tansu and on Kafka,
where it is refused while a member is alive.

The views are idempotent by sequence, and the cache keeps the higher sequence, so replay
converges to the same state as the first run. The down-conversion agent shares the group and
reads again too: `orders-v1` gets a second copy of each event, with the same event id
(consumers deduplicate by event id, as after any redelivery).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import DeleteGroupsRequest

from app.cli.preflight import check_broker
from app.faust_compat import send_to_node
from app.kafka import TopicError, delete_topics, make_admin
from app.settings import Settings
from app.topology import is_view_topic

# Kafka error codes of DeleteGroups that are not failures of the replay.
GROUP_ID_NOT_FOUND = 69


class ReplayError(TopicError):
    """Replay refused: a worker is still running, or a server refused a step."""


@dataclass
class ReplayReport:
    """What replay deleted."""

    group: str
    group_existed: bool = False
    topics: list[str] = field(default_factory=list)
    table_dirs: list[Path] = field(default_factory=list)
    cached_entities: int = 0

    def lines(self) -> list[str]:
        return [
            f"consumer group {self.group}: {'deleted' if self.group_existed else 'had no offsets'}",
            f"view topics deleted: {', '.join(self.topics) or 'none'}",
            f"local table stores deleted: {', '.join(map(str, self.table_dirs)) or 'none'}",
            f"cached entities deleted: {self.cached_entities}",
            "start the workers: they rebuild every view and the cache from offset 0",
        ]


def view_topics(app_id: str, topics: list[str]) -> list[str]:
    """The topics holding view state: changelogs and repartition (`-updates`) topics of `app_id`."""
    return sorted(t for t in topics if is_view_topic(app_id, t))


def table_dirs(settings: Settings) -> list[Path]:
    """Faust's table stores: `<datadir>/v<version>/tables` (datadir defaults to `<app id>-data`)."""
    datadir = Path(settings.data_dir or f"{settings.app_id}-data")
    return sorted(p for p in datadir.glob("v*/tables") if p.is_dir())


async def worker_answers(settings: Settings) -> bool:
    """True when a worker's web server answers on this machine's configured web port."""
    url = f"http://{settings.web_host}:{settings.web_port}/health/live"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            async with session.get(url) as response:
                return response.status < 500
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


async def delete_group(admin: AIOKafkaAdminClient, group: str) -> bool:
    """Delete consumer group `group` with a started admin client; False when it did not exist."""
    node = await admin.find_coordinator(group)
    response = await send_to_node(admin, node, DeleteGroupsRequest([group]))
    for name, code in response.results:
        if code == GROUP_ID_NOT_FOUND:
            return False
        if code:
            error = for_code(code).__name__
            raise ReplayError(f"the broker did not delete consumer group {name}: {error}"
                              + (" (stop every worker first)" if "NonEmpty" in error else ""))
    return True


async def delete_cached_entities(redis_url: str, namespace: str = "") -> int:
    """Delete every `<namespace>entity:*` key (SCAN + UNLINK, never KEYS); returns how many."""
    from app.cache import connect_redis, every_entity_key

    redis = connect_redis(redis_url, timeout=5)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=every_entity_key(namespace), count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await redis.unlink(*batch)
    finally:
        await redis.aclose()
    return deleted


async def replay(settings: Settings) -> ReplayReport:
    """Delete the group, the view topics, the local table stores and the cached entities."""
    if settings.consumer_auto_offset_reset != "earliest":
        raise ReplayError("CONSUMER_AUTO_OFFSET_RESET must be 'earliest' for a replay to read every event "
                          f"(it is {settings.consumer_auto_offset_reset!r})")
    if await worker_answers(settings):
        raise ReplayError(f"a worker answers at http://{settings.web_host}:{settings.web_port}: "
                          "stop every worker first")
    report = ReplayReport(group=settings.app_id)
    admin = make_admin(settings)
    await admin.start()
    try:
        # The group first: on Kafka it is refused while a worker runs, before anything is lost.
        report.group_existed = await delete_group(admin, settings.app_id)
        report.topics = view_topics(settings.app_id, await admin.list_topics())
        await delete_topics(admin, report.topics)
    finally:
        await admin.close()
    for path in table_dirs(settings):
        shutil.rmtree(path)
        report.table_dirs.append(path)
    if settings.redis_url:
        report.cached_entities = await delete_cached_entities(settings.redis_url)
    return report


async def replay_command(settings: Settings) -> int:
    """`replay`; a refusal (a worker still running) is one line and exit 1."""
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    await check_broker(settings)
    try:
        report = await replay(settings)
    except (TopicError, KafkaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0

"""refresh_cache_<entity>: applies every event to the Redis entity cache.

Creates and updates write the event's state, deletes write a tombstone, each only if its
sequence is newer than what Redis holds (`CacheRepository.apply`), so duplicates, replays
and reordering across batches are harmless. A batch is one script call per few hundred
distinct keys, the highest sequence per key (`CacheRepository.apply_many`). It is acked only
once Redis took all of it; while Redis is down the agent retries (recorded in `app.retries`,
so a stage stuck on it shows on `/health/ready`), and readers fall back to the database.
Undecodable messages are never cached; on a topic without a down-converter (which
dead-letters them itself) they go to `<topic>.dlq`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faust

from agents.batching import WITHIN, produce_all, take_ready
from app.cache import CacheRepository, CacheResource
from app.retries import Retries, retries_of
from app.settings import Settings
from app.topology import downconvert_targets, root_models
from app.views import plain_state
from app.wire.deadletter import dead_letter
from app.wire.messages import decode, incoming
from app.wire.schemas import EventSchema, load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refresh:
    """What one event asks of the cache."""

    entity: str
    key: str
    sequence: int
    state: dict[str, Any] | None  # None: deleted


def refreshes(schema: EventSchema, values: Sequence[bytes | None]
              ) -> tuple[list[Refresh], list[tuple[int, Exception]]]:
    """The cache updates of a batch of event values, and the (index, error) of each undecodable one."""
    out, poison = [], []
    for i, value in enumerate(values):
        try:
            record = decode(schema, value or b"")
        except Exception as exc:  # poison: dead-lettered (here or by the down-converter), never cached
            poison.append((i, exc))
            continue
        if record["op"] == "read":
            continue
        out.append(Refresh(record["entity"], record["key"], record["sequence"],
                           None if record["op"] == "delete" else plain_state(record["data"])))
    return out, poison


async def apply_all(repo: CacheRepository, batch: list[Refresh], *, stage: str = "cache",
                    retries: Retries | None = None) -> None:
    """Apply a batch in one script call per chunk, retrying with backoff until Redis took it all."""
    # Order does not matter: each write is conditional on its sequence, and per key only the
    # highest sequence of the batch is sent. One call, not one per event: a batch of 500
    # concurrent calls overran redis-py 8's connection cap and was retried forever.
    updates = [(r.entity, r.key, r.sequence, r.state) for r in batch]
    await (retries or Retries()).until_done(stage, lambda: repo.apply_many(updates))


def install(app: faust.App, settings: Settings, resource: CacheResource) -> None:
    """Declare one cache-refresh agent per root entity's current topic, writing through
    `resource` (the worker's one repository, shared with `/entities`)."""
    # Poison on a topic the down-converter reads is dead-lettered by it; here only the rest.
    downconverted = set(downconvert_targets(settings))
    for model in root_models():
        schema = load(model.__entity__, model.__schema_version__)
        _declare(app, resource, schema, dead_letters=schema.entity not in downconverted)


def _declare(app: faust.App, resource: CacheResource, schema: EventSchema, *, dead_letters: bool) -> None:
    topic = app.topic(schema.topic, key_serializer="raw", value_serializer="raw")
    name = f"refresh_cache_{schema.entity}"
    retries = retries_of(app)

    async def refresh_cache(stream: faust.StreamT[Any]) -> None:
        async for events in take_ready(stream, 500, WITHIN):
            batch, poison = refreshes(schema, [e.message.value for e in events])
            if poison and dead_letters:
                await produce_all(app, [dead_letter(schema.topic, incoming(events[i].message), exc)
                                        for i, exc in poison], stage=name)
            if batch:
                await apply_all(resource.repo, batch, stage=name, retries=retries)

    refresh_cache.stages = ("cache",)  # type: ignore[attr-defined]  # its metric stage (app/ops/metrics.py)
    app.agent(topic, name=name)(refresh_cache)

"""The materialized views as Faust tables: every entity's table and the aggregations declared on it.

Stage 1 (`ApplyEvents`, a job of the entity's `process_<entity>` agent in
`agents/entity_pass.py`, so it shares one pass over the entity's topic with down-conversion)
keeps the entity's latest-state table and derives the per-partition values of the
aggregations its model declares (`__aggregations__`, `app/aggregations.py`); stage 2
(`apply_<aggregation>_updates`, one agent per aggregation) merges them into the aggregation's
table. See `app.views` for why this makes every view idempotent. An entity that declares no
aggregation gets its table alone, with no code.

Both stages work in batches (`agents/batching.take_ready`: at most `BATCH` events, a window
that grows from 5 to 200 ms while a backlog waits behind the batch and shrinks back) and
write each changed key once per batch, as Kafka Streams' record cache does at commit (KIP-63):
one changelog message per distinct table key and one repartition message per aggregation key
and source partition, instead of one per event. Last-wins coalescing is exact here: stage 1
sends absolute per-partition values with the offset of the batch's last event as version, and
stage 2 keeps the value of the highest (epoch, version) per part. A batch has no await between
its events, so a rebalance cannot clear the aggregations in the middle of one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, cast

import faust
from faust.streams import _current_event
from faust.types import EventT

from agents.batching import BATCH, WITHIN, produce_all, take_ready
from agents.entity_pass import Decoded, Job
from app.settings import Settings
from app.topology import aggregations_of, changelog_topic, root_models, updates_topic
from app.views import (
    Aggregation,
    BadUpdate,
    BatchItem,
    PartitionAggregates,
    apply_batch,
    merge_part,
    parse_update,
    present_state,
)
from app.web.tables import View
from app.wire.deadletter import dead_letter
from app.wire.messages import Outgoing, incoming

log = logging.getLogger(__name__)


# The view tables as Faust tables. Every view table (an entity's latest state, each aggregation)
# has raw string keys and a compacted JSON changelog with as many partitions as the event topics,
# and is written once per key per batch into the changelog partition of the event that last
# changed the key, so lookups are routed to the worker that owns the key's partition and standby
# workers keep copies.


def state_table(app: faust.App, settings: Settings, name: str) -> faust.Table:
    """A view table `name` with raw string keys and a compacted JSON changelog."""
    partitions = settings.topic_partitions
    # Raw string keys: the changelog partition of a key is then the partition its source
    # event had, so Faust's router finds the owner of a key by its hash.
    changelog = app.topic(changelog_topic(settings.app_id, name), key_type=str, key_serializer="raw",
                          value_serializer="json", partitions=partitions, compacting=True,
                          acks=False, internal=True)
    table = cast(faust.Table, app.Table(name, default=None, partitions=partitions, key_type=str,
                                        changelog_topic=changelog))
    # The table serializes changelog keys itself (json for str keys): make it raw too, or
    # recovered and standby copies would hold '"12"' where the active one holds '12'.
    table.key_serializer = "raw"
    return table


@contextlib.contextmanager
def processing(event: Any) -> Iterator[None]:
    """Table writes in this block go where they would while Faust processed `event`.

    Faust puts a table write in the changelog partition (and RocksDB partition store) of the
    *current* event. Writing a batch's keys after the batch, each must go where the event
    that changed it came from, as it did when written per event; Faust's stream sets the
    same context variable for each event it yields.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def write_as(event: Any, table: faust.Table, key: str, value: Any) -> None:
    """`table[key] = value` as if while processing `event`."""
    with processing(event):
        table[key] = value


class ApplyEvents:
    """Stage 1 for one entity: its latest-state table and its aggregations' per-partition values."""

    stage = "views"

    def __init__(self, table: faust.Table, aggregations: Sequence[Aggregation],
                 topics: dict[str, str]) -> None:
        self.table = table
        self.aggregations = tuple(aggregations)
        self.topics = topics  # aggregation name -> its repartition topic
        # Per source partition; cleared on a rebalance and rebuilt from the table on the
        # partition's next event (`app.views.apply_batch`).
        self.aggregates: dict[int, PartitionAggregates] = {}

    def entries_of(self, partition: int) -> list[dict[str, Any]]:
        return [v for v in self.table.values() if v and v.get("p") == partition]

    def run(self, events: Sequence[EventT], records: Sequence[Decoded]) -> list[Outgoing]:
        items: list[BatchItem] = []
        for event, record in zip(events, records, strict=True):
            msg = event.message
            if isinstance(record, Exception):  # poison is dead-lettered by the down-converter; skip it here
                log.warning("views: undecodable message at %s/%s/%s: %s", msg.topic, msg.partition, msg.offset, record)
                items.append((msg.partition, msg.offset, None, event))
            else:
                items.append((msg.partition, msg.offset, record, event))
        written, changed = apply_batch(self.aggregations, self.aggregates, self.table.get, self.entries_of,
                                       items, time.time_ns)
        for key, (event, entry) in written.items():
            write_as(event, self.table, key, entry)  # one changelog message per key per batch
        # One message per aggregation key and partition, with its value after the batch, sent
        # straight to the producer (Faust's Topic.send costs ~150 µs a message) and acked
        # before the batch is.
        out = []
        for p, part in changed.items():
            for aggregation in self.aggregations:
                topic = self.topics[aggregation.name]
                state = part.agg.parts[aggregation.name]
                for key in part.keys[aggregation.name]:
                    body = {"p": p, "epoch": part.agg.epoch, "version": part.version,
                            "value": aggregation.value(state, key)}
                    # A window's messages carry its start as their timestamp.
                    stamp = float(key) if aggregation.window is not None else None
                    out.append(Outgoing(topic, key.encode(), json.dumps(body).encode(), None, [], stamp))
        return out

    def sent(self, out: list[Outgoing]) -> None:
        pass


async def merge_into(app: faust.App, target: faust.Table, stream: faust.StreamT[Any],
                     aggregation: Aggregation) -> None:
    """Stage 2 of one aggregation: each batch's newest part per key, written once per key."""
    keep = aggregation.keep
    async for events in take_ready(stream, BATCH, WITHIN):
        merged: dict[str, tuple[Any, Any]] = {}
        poison = []
        horizon = time.time() - keep if keep is not None else None
        if horizon is not None and events:
            # Windows are kept `keep` seconds (wall clock); older ones are dropped, not updated.
            with processing(events[0]):
                for old in [k for k in list(target.keys()) if int(k) < horizon]:
                    del target[old]
        for event in events:
            msg = event.message
            try:
                key, update = parse_update(msg.key, msg.value, aggregation)
            except BadUpdate as exc:
                log.warning("views: dead-lettering %s/%s/%s: %s", msg.topic, msg.partition, msg.offset, exc)
                poison.append(dead_letter(msg.topic, incoming(msg), exc))
                continue
            if horizon is not None and int(key) < horizon:
                continue
            stored = merged[key][1] if key in merged else target.get(key)
            value = merge_part(stored, update["p"], update["epoch"], update["version"], update["value"])
            if value is not None:
                merged[key] = (event, value)
        if poison:
            await produce_all(app, poison, stage=stream.prefix)
        for key, (event, value) in merged.items():
            write_as(event, target, key, value)  # one changelog message per key per batch


class ApplyUpdates:
    """Stage 2 of one aggregation, the agent `apply_<aggregation>_updates`: each batch's newest
    part per key merged into the aggregation's table, written once per key."""

    #: The pipeline stages its events count for (app/ops/metrics.py): none, its input is the
    #: internal repartition topic stage 1 writes.
    stages: tuple[str, ...] = ()

    def __init__(self, app: faust.App, target: faust.Table, aggregation: Aggregation) -> None:
        self.app = app
        self.target = target
        self.aggregation = aggregation
        self.__doc__ = f"Stage 2 of {aggregation.name}: its parts merged into its table."

    async def __call__(self, stream: faust.StreamT[Any]) -> None:
        """The agent's body: Faust calls it with the stream of the updates topic."""
        await merge_into(self.app, self.target, stream, self.aggregation)


def _declare_stage2(app: faust.App, settings: Settings, aggregation: Aggregation, target: faust.Table) -> None:
    # Stage 1 sends JSON; stage 2 reads raw bytes and validates them itself, so poison is
    # dead-lettered instead of crashing the agent (Faust's decode error would).
    topic = app.topic(updates_topic(settings.app_id, aggregation.name), partitions=settings.topic_partitions,
                      internal=True, key_type=None, key_serializer="raw", value_serializer="raw")
    app.agent(topic, name=f"apply_{aggregation.name}_updates")(ApplyUpdates(app, target, aggregation))


def install(app: faust.App, settings: Settings) -> tuple[dict[str, View], dict[tuple[str, int], Job]]:
    """Declare every entity's table, its aggregations' tables and their stage-2 agents; returns
    the tables by name (for the web layer) and each entity topic's stage-1 job."""
    views: dict[str, View] = {}
    jobs: dict[tuple[str, int], Job] = {}
    stage1: list[ApplyEvents] = []
    for model in root_models():
        entity = model.__entity__
        table = state_table(app, settings, entity)
        views[entity] = View(table, f"latest state per {entity} key", present_state)
        aggregations = aggregations_of(entity)
        for aggregation in aggregations:
            target = state_table(app, settings, aggregation.name)
            views[aggregation.name] = View(target, aggregation.description, aggregation.present, aggregation.window)
            _declare_stage2(app, settings, aggregation, target)
        job = ApplyEvents(table, aggregations, {a.name: updates_topic(settings.app_id, a.name) for a in aggregations})
        jobs[(entity, model.__schema_version__)] = job
        stage1.append(job)

    # mode's stub wants a `signal=` parameter; Faust passes it in **kwargs, which this takes.
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode's stub wants a signal= parameter
    async def forget_aggregates(sender: Any, revoked: Any, **_: Any) -> None:
        for job in stage1:
            job.aggregates.clear()  # rebuilt from the table for each partition on its next event

    return views, jobs

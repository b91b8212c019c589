"""The materialized views as Faust tables: stage 1's job and the aggregate agents.

Stage 1 (`ApplyOrderEvents`, a job of the `process_orders` agent in `agents/entity_pass.py`,
so it shares one pass over `orders-v2` with down-conversion) keeps `orders` and derives the
per-partition aggregates; stage 2 (`apply_<view>_updates`) merges them into the views keyed
by customer, status and minute. See `app.views` for why this makes every view idempotent.

Both stages work in batches (`agents/batching.take_ready`: at most `BATCH` events, a window
that grows from 5 to 200 ms while a backlog waits behind the batch and shrinks back) and
write each changed key once per batch, as Kafka Streams' record cache does at commit (KIP-63):
one changelog message per distinct table key and one repartition message per aggregate key
and source partition, instead of one per event. Last-wins coalescing is exact here: stage 1
sends absolute per-partition values with the offset of the batch's last event as version, and
stage 2 keeps the value of the highest (epoch, version) per part. A batch has no await between
its events, so a rebalance cannot clear the aggregates in the middle of one.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
from faust.types import EventT

from agents.batching import BATCH, WITHIN, take_ready
from agents.entity_pass import Decoded, Job
from agents.latest import processing, state_table, write_as
from app.wire.deadletter import Outgoing, dead_letter, incoming, produce_all
from app.wire.schemas import field_type, load, non_null
from app.settings import Settings
from app.web.tables import View
from app.topology import updates_topic
from app.views import (
    WINDOW_KEEP,
    BadUpdate,
    BatchItem,
    PartitionAggregates,
    apply_batch,
    merge_part,
    parse_update,
    present_count,
    present_customer,
    present_order,
)

log = logging.getLogger(__name__)


#: The (entity, schema version) whose topic stage 1 reads.
SOURCE = ("orders", 2)


def install(app: faust.App, settings: Settings) -> tuple[dict[str, View], Job]:
    """Declare the view tables and the stage-2 agents; returns the tables by name (for the web
    layer) and stage 1, the job to run on every batch of `orders-v2`."""
    partitions = settings.topic_partitions

    orders, customer_orders, orders_by_status, orders_per_minute = (
        state_table(app, settings, name)
        for name in ("orders", "customer_orders", "orders_by_status", "orders_per_minute"))

    def updates(view: str, *, raw: bool = False) -> faust.TopicT:
        # Stage 1 sends JSON; stage 2 reads raw bytes and validates them itself, so poison
        # is dead-lettered instead of crashing the agent (Faust's decode error would).
        return app.topic(updates_topic(settings.app_id, view), partitions=partitions, internal=True,
                         key_type=None if raw else str, key_serializer="raw",
                         value_serializer="raw" if raw else "json")

    customer_updates = updates("customer_orders")
    status_updates = updates("orders_by_status")
    minute_updates = updates("orders_per_minute")
    source = load(*SOURCE)
    # The only keys orders_by_status can have: the status enum's symbols.
    status_symbols = frozenset(non_null(field_type({"fields": source.data_fields()}, "status"))["symbols"])
    aggregates: dict[int, PartitionAggregates] = {}

    @app.on_partitions_revoked.connect
    async def forget_aggregates(sender: Any, revoked: Any, **_: Any) -> None:
        aggregates.clear()  # rebuilt from `orders` for each partition on its next event

    def emit(p: int, version: int, agg: PartitionAggregates, customers: set[str], statuses: set[str],
             minutes: set[int]) -> list[Outgoing]:
        """Stage 1's messages for one partition's changed aggregate keys (key-hashed partitions)."""
        def update(topic: faust.TopicT, key: str, value: Any, timestamp: float | None = None) -> Outgoing:
            body = {"p": p, "epoch": agg.epoch, "version": version, "value": value}
            return Outgoing(topic.get_topic_name(), key.encode(), json.dumps(body).encode(), None, [], timestamp)

        return ([update(customer_updates, c, agg.customer_value(c)) for c in customers]
                + [update(status_updates, s, agg.statuses.get(s, 0)) for s in statuses]
                + [update(minute_updates, str(m), agg.minutes.get(m, 0), float(m)) for m in minutes])

    class ApplyOrderEvents:
        """Stage 1, a job of the `process_orders` agent (`agents/entity_pass.py`)."""

        stage = "views"

        def run(self, events: Sequence[EventT], records: Sequence[Decoded]) -> list[Outgoing]:
            items: list[BatchItem] = []
            for event, record in zip(events, records, strict=True):
                msg = event.message
                if isinstance(record, Exception):  # poison is dead-lettered by the down-converter; skip it here
                    log.warning("views: undecodable message at %s/%s: %s", msg.partition, msg.offset, record)
                    items.append((msg.partition, msg.offset, None, event))
                else:
                    items.append((msg.partition, msg.offset, record, event))
            written, changed = apply_batch(
                aggregates, orders.get, lambda p: [v for v in orders.values() if v and v.get("p") == p],
                items, time.time_ns)
            for key, (event, entry) in written.items():
                write_as(event, orders, key, entry)  # one changelog message per order per batch
            # One message per aggregate key and partition, with its value after the batch, sent
            # straight to the producer (Faust's Topic.send costs ~150 µs a message) and acked
            # before the batch is.
            return [m for p, part in changed.items() for m in emit(
                p, part.version, part.agg, part.customers, part.statuses, part.minutes)]

        def sent(self, out: list[Outgoing]) -> None:
            pass

    async def merge_into(target: faust.Table, stream: faust.StreamT[Any], kind: str) -> None:
        async for events in take_ready(stream, BATCH, WITHIN):
            merged: dict[str, tuple[Any, Any]] = {}
            poison = []
            horizon = time.time() - WINDOW_KEEP
            if kind == "minute" and events:
                # Windows are kept one hour (wall clock); older ones are dropped, not updated.
                with processing(events[0]):
                    for old in [k for k in list(target.keys()) if int(k) < horizon]:
                        del target[old]
            for event in events:
                msg = event.message
                try:
                    key, update = parse_update(msg.key, msg.value, kind, status_symbols)
                except BadUpdate as exc:
                    log.warning("views: dead-lettering %s/%s/%s: %s", msg.topic, msg.partition, msg.offset, exc)
                    poison.append(dead_letter(msg.topic, incoming(msg), exc))
                    continue
                if kind == "minute" and int(key) < horizon:
                    continue
                stored = merged[key][1] if key in merged else target.get(key)
                value = merge_part(stored, update["p"], update["epoch"], update["version"], update["value"])
                if value is not None:
                    merged[key] = (event, value)
            if poison:
                await produce_all(app, poison, stage=stream.prefix)
            for key, (event, value) in merged.items():
                write_as(event, target, key, value)  # one changelog message per key per batch

    async def apply_customer_orders_updates(stream: faust.StreamT[Any]) -> None:
        await merge_into(customer_orders, stream, "customer")

    async def apply_orders_by_status_updates(stream: faust.StreamT[Any]) -> None:
        await merge_into(orders_by_status, stream, "status")

    async def apply_orders_per_minute_updates(stream: faust.StreamT[Any]) -> None:
        await merge_into(orders_per_minute, stream, "minute")

    app.agent(updates("customer_orders", raw=True),
              name="apply_customer_orders_updates")(apply_customer_orders_updates)
    app.agent(updates("orders_by_status", raw=True),
              name="apply_orders_by_status_updates")(apply_orders_by_status_updates)
    app.agent(updates("orders_per_minute", raw=True),
              name="apply_orders_per_minute_updates")(apply_orders_per_minute_updates)
    return {
        "orders": View(orders, "latest state per order", present_order),
        "customer_orders": View(customer_orders, "aggregate per customer", present_customer),
        "orders_by_status": View(orders_by_status, "count per status", present_count),
        "orders_per_minute": View(orders_per_minute, "tumbling window 60 s, kept 1 h (key: window start, epoch s)",
                                  present_count),
    }, ApplyOrderEvents()

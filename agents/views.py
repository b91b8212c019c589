"""apply_order_events and the aggregate agents: the materialized views as Faust tables.

Stage 1 (`apply_order_events`, partitioned like `orders-v2`) keeps `orders` and derives the
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

import contextlib
import json
import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faust
from faust.streams import _current_event

from agents.batching import take_ready
from app.deadletter import Outgoing, dead_letter, dlq_topic, incoming, produce_all
from app.events import decode
from app.schemas import field_type, load, non_null
from app.settings import Settings
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


@dataclass
class View:
    """A table as the web layer shows it."""

    table: faust.Table
    kind: str
    present: Any  # stored value -> what readers see (None: hidden)


AGGREGATES = ("customer_orders", "orders_by_status", "orders_per_minute")
#: Events per batch, and the shortest and longest window a batch waits to fill: the short one
#: bounds the latency it adds while the worker keeps up; under a backlog the window grows, so
#: batches coalesce more (bench/catchup.py: 5 ms fixed ~300 events/s, 5-200 ms ~800 /s).
BATCH = 1000
WITHIN = (0.005, 0.2)


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


def dead_letter_topics(app_id: str) -> list[str]:
    """The dead-letter topics of the repartition topics (created before the worker starts)."""
    return [dlq_topic(f"{app_id}-{view}-updates") for view in AGGREGATES]


def install(app: faust.App, settings: Settings) -> dict[str, View]:
    """Declare the view tables and their agents; returns them by name for the web layer."""
    partitions = settings.topic_partitions

    def table(name: str) -> faust.Table:
        # Raw string keys: the changelog partition of a key is then the partition its
        # source event had, so Faust's router finds the owner of a key by its hash.
        changelog = app.topic(f"{settings.app_id}-{name}-changelog", key_type=str, key_serializer="raw",
                              value_serializer="json", partitions=partitions, compacting=True,
                              acks=False, internal=True)
        t = app.Table(name, default=None, partitions=partitions, key_type=str,
                      changelog_topic=changelog)
        # The table serializes changelog keys itself (json for str keys): make it raw too, or
        # recovered and standby copies would hold '"12"' where the active one holds '12'.
        t.key_serializer = "raw"
        return t

    orders = table("orders")
    customer_orders = table("customer_orders")
    orders_by_status = table("orders_by_status")
    orders_per_minute = table("orders_per_minute")

    def updates(view: str, *, raw: bool = False) -> faust.TopicT:
        # Stage 1 sends JSON; stage 2 reads raw bytes and validates them itself, so poison
        # is dead-lettered instead of crashing the agent (Faust's decode error would).
        return app.topic(f"{settings.app_id}-{view}-updates", partitions=partitions, internal=True,
                         key_type=None if raw else str, key_serializer="raw",
                         value_serializer="raw" if raw else "json")

    customer_updates = updates("customer_orders")
    status_updates = updates("orders_by_status")
    minute_updates = updates("orders_per_minute")
    source = load("orders", 2)
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

    async def apply_order_events(stream: faust.StreamT[Any]) -> None:
        async for events in take_ready(stream, BATCH, WITHIN):
            items: list[BatchItem] = []
            for event in events:
                msg = event.message
                try:
                    record = decode(source, msg.value)
                except Exception as exc:  # poison is dead-lettered by the down-converter; skip it here
                    log.warning("views: undecodable message at %s/%s: %s", msg.partition, msg.offset, exc)
                    record = None
                items.append((msg.partition, msg.offset, record, event))
            written, changed = apply_batch(
                aggregates, orders.get, lambda p: [v for v in orders.values() if v and v.get("p") == p],
                items, time.time_ns)
            for key, (event, entry) in written.items():
                write_as(event, orders, key, entry)  # one changelog message per order per batch
            # One message per aggregate key and partition, with its value after the batch, sent
            # straight to the producer (Faust's Topic.send costs ~150 µs a message) and acked
            # before the batch is.
            await produce_all(app, [m for p, part in changed.items() for m in emit(
                p, part.version, part.agg, part.customers, part.statuses, part.minutes)], stage="apply_order_events")

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

    raw_source = app.topic(source.topic, key_serializer="raw", value_serializer="raw")
    app.agent(raw_source, name="apply_order_events")(apply_order_events)
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
    }

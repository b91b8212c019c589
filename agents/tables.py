"""The view tables as Faust tables: declaring one, and writing a key as if while processing an event.

Every view table (an entity's latest state, each aggregation) has raw string keys and a
compacted JSON changelog with as many partitions as the event topics, and is written once per
key per batch into the changelog partition of the event that last changed the key, so lookups
are routed to the worker that owns the key's partition and standby workers keep copies.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any, cast

import faust
from faust.streams import _current_event

from app.settings import Settings
from app.topology import changelog_topic


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

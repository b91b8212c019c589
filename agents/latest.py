"""Every entity's latest-state table (`/tables/<entity>/`), kept by a job of the entity's one pass.

No code per entity: `app/main.py` gives each root entity a table named after it, unless a
view module keeps one already (the orders views' stage 1 keeps `orders`, with the creation
times its aggregates need). The table holds, per key, the newest event's state and sequence
(`app.views.apply_latest`: a duplicate or older event changes nothing, a delete leaves a
tombstone), written once per key per batch into the changelog partition of the event that
last changed it, so lookups are routed to the worker that owns the key's partition and
standby workers keep copies, as for every view.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import EventT

from agents.entity_pass import Decoded
from app.settings import Settings
from app.topology import changelog_topic
from app.views import apply_latest, plain_state
from app.wire.deadletter import Outgoing


def state_table(app: faust.App, settings: Settings, name: str) -> faust.Table:
    """A view table `name` with raw string keys and a compacted JSON changelog."""
    partitions = settings.topic_partitions
    # Raw string keys: the changelog partition of a key is then the partition its source
    # event had, so Faust's router finds the owner of a key by its hash.
    changelog = app.topic(changelog_topic(settings.app_id, name), key_type=str, key_serializer="raw",
                          value_serializer="json", partitions=partitions, compacting=True,
                          acks=False, internal=True)
    table = app.Table(name, default=None, partitions=partitions, key_type=str, changelog_topic=changelog)
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


class LatestState:
    """The job keeping an entity's latest-state table, one write per changed key per batch."""

    stage = "views"

    def __init__(self, table: faust.Table) -> None:
        self.table = table

    def run(self, events: Sequence[EventT], records: Sequence[Decoded]) -> list[Outgoing]:
        written: dict[str, tuple[EventT, dict[str, Any]]] = {}
        for event, record in zip(events, records, strict=True):
            if isinstance(record, Exception):
                continue  # poison: dead-lettered by the stages that own its topic's output
            key = record["key"]
            current = written[key][1] if key in written else self.table.get(key)
            entry = apply_latest(current, record["sequence"], plain_state(record["data"]), event.message.partition)
            if entry is not None:
                written[key] = (event, entry)
        for key, (event, entry) in written.items():
            write_as(event, self.table, key, entry)
        return []

    def sent(self, out: list[Outgoing]) -> None:
        pass

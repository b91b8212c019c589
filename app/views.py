"""Materialized-view logic as pure functions: an entity's latest state and its aggregations.

Every entity gets a latest-state table; an entity may also declare aggregations beside its
model (`__aggregations__`, `app/aggregations.py`). They are built in two stages so every one
of them is idempotent:

1. The entity's table (key: its key) keeps each key's latest state and the `sequence` that
   produced it. An event whose sequence is not newer changes nothing. A delete keeps a
   tombstone (`state: None`) so a late, older event cannot resurrect the key; the web hides it.
2. Aggregations keyed differently (by a field, by a window) are fed through repartition
   topics with *absolute* values per source partition — "partition 2 holds 5 paid orders, as
   of offset 812" — instead of deltas. Stage 1 derives them from its table (and rebuilds them
   from it after a rebalance), stage 2 keeps the newest value per source partition and sums
   the parts. A duplicate or replayed message re-states a value; it can never count twice.

   "Newest" is ordered by (epoch, offset). The epoch is the wall-clock time at which stage 1
   rebuilt the partition's aggregations from its table: after a crash, the new owner re-reads
   events the old one had already handled, and its rebuilt values (from the table, so
   complete) carry lower offsets than the old owner's last updates. Ordered by offset alone
   they would be dropped as stale, and an update the old owner never got to send before it
   died would stay missing (seen by the fault-injection suite: a status count one short).
   This assumes the workers' clocks agree to within a takeover (the 10 s session timeout at
   least): a worker whose clock is further behind would have its updates dropped as stale.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from app.errors import EventsError

State = dict[str, Any]


class Aggregation(Protocol):
    """What stage 1 and 2 need of an aggregation declared on a model (`app/aggregations.py`)."""

    #: Its table's name (and `<app id>-<name>-updates`, its repartition topic).
    name: str
    #: Window size in seconds when its keys are window starts (epoch seconds); None otherwise.
    window: int | None
    #: The field whose value at a key's first event the entity's table keeps ("created"), if any.
    time: str | None
    #: Seconds a window is kept (wall clock) before stage 2 drops it; None: kept for good.
    keep: int | None
    #: What its table holds, for `/tables/`.
    description: str

    def new(self) -> Any:
        """An empty per-partition state."""

    def apply(self, part: Any, before: State | None, after: State | None, created: int | None) -> set[str]:
        """Move one key of the partition from `before` to `after` (None: absent); `created` is
        its first-event time when this change is its first. The aggregation keys that changed."""

    def keys(self, part: Any) -> set[str]:
        """Every aggregation key the partition's state holds a value for."""

    def value(self, part: Any, key: str) -> Any:
        """The partition's absolute value for `key`: what stage 1 sends."""

    def problem(self, key: str, value: Any) -> str | None:
        """What is wrong with a repartition message's key and value (poison), or None."""

    def present(self, stored: dict[str, Any]) -> Any:
        """The merged parts as readers see them (None: hidden)."""


@dataclass(frozen=True)
class Change:
    """One applied change of a key: its state before and after (None = absent/deleted)."""

    key: str
    before: State | None
    after: State | None
    created: int | None = None  # first-event time (epoch µs) when this change is the key's first


def time_field(aggregations: Sequence[Aggregation]) -> str | None:
    """The one field whose first-event value the entity's table keeps, if any aggregation needs it."""
    fields = {a.time for a in aggregations if a.time is not None}
    if len(fields) > 1:
        raise ValueError(f"windows of one entity must share their time field, got {sorted(fields)}")
    return next(iter(fields), None)


def apply_event(key: str, stored: dict[str, Any] | None, sequence: int, state: State | None,
                partition: int, time: str | None = None) -> tuple[dict[str, Any], Change] | None:
    """The new table entry of a key for an event and the change it makes; None if not newer.

    With a `time` field the entry keeps its value at the key's first event ("created", epoch
    µs) even as a tombstone: a window counts creations, which a later delete does not undo.
    """
    if stored is not None and stored["seq"] >= sequence:
        return None
    before = stored["state"] if stored is not None else None
    entry: dict[str, Any] = {"seq": sequence, "state": state, "p": partition}
    first = None
    if time is not None:
        created = stored.get("created") if stored is not None else None
        if created is None and state is not None and state.get(time) is not None:
            created = first = micros(state[time])
        entry["created"] = created
    return entry, Change(key, before, state, first)


def micros(value: Any) -> int:
    """Epoch microseconds of an Avro timestamp (fastavro gives datetimes)."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000) if value.tzinfo else int(
            value.replace(tzinfo=timezone.utc).timestamp() * 1_000_000)
    return int(value)


def plain_state(data: State | None) -> State | None:
    """An event's data with timestamps as epoch microseconds, as the outbox and cache hold it."""
    if data is None:
        return None
    return {k: micros(v) if isinstance(v, datetime) else plain_state(v) if isinstance(v, dict) else v
            for k, v in data.items()}


@dataclass
class PartitionAggregates:
    """The aggregations' states for one source partition, derived from the entity's table."""

    # When these were rebuilt from the table (ns since the epoch): orders the updates.
    epoch: int = 0
    parts: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchChange:
    """What a stage-1 batch changed in one source partition: per aggregation, the keys to
    re-state downstream, with the offset of the batch's last event of the partition as version."""

    agg: PartitionAggregates
    version: int
    keys: dict[str, set[str]]


#: One stage-1 input: (partition, offset, decoded record or None for poison, the caller's tag).
BatchItem = tuple[int, int, "State | None", Any]


def apply_batch(aggregations: Sequence[Aggregation], aggregates: dict[int, PartitionAggregates],
                lookup: Callable[[str], dict[str, Any] | None],
                entries_of: Callable[[int], list[dict[str, Any]]], items: list[BatchItem],
                epoch: Callable[[], int]) -> tuple[dict[str, tuple[Any, dict[str, Any]]], dict[int, BatchChange]]:
    """Stage 1 for a batch, without I/O: the table entries to write once each (with the tag of
    the item that last changed each) and, per partition, the aggregation keys to re-state.

    Equal to applying the items one at a time and keeping the last write of each key: later
    items read the batch's own writes, and the aggregations' values are absolute.
    """
    time = time_field(aggregations)
    written: dict[str, tuple[Any, dict[str, Any]]] = {}
    changed: dict[int, BatchChange] = {}
    for p, offset, record, tag in items:
        agg = aggregates.get(p)
        if agg is None and aggregations:
            # A new epoch: these values replace whatever an earlier owner sent (see above).
            # The table holds every earlier batch's writes; none of this batch's is of `p`.
            agg = aggregates[p] = rebuild(aggregations, entries_of(p), epoch=epoch())
            changed[p] = BatchChange(agg, offset, {a.name: a.keys(agg.parts[a.name]) for a in aggregations})
        if record is None:
            continue  # poison: dead-lettered by the down-converter
        key = record["key"]
        current = written[key][1] if key in written else lookup(key)
        applied = apply_event(key, current, record["sequence"], plain_state(record["data"]), p, time)
        if applied is None:
            continue  # a duplicate or an older event: changes nothing
        entry, change = applied
        written[key] = (tag, entry)
        if agg is None:
            continue  # no aggregations: the table is all there is
        part = changed.get(p)
        if part is None:
            part = changed[p] = BatchChange(agg, offset, {a.name: set() for a in aggregations})
        part.version = offset
        for a in aggregations:
            part.keys[a.name] |= a.apply(agg.parts[a.name], change.before, change.after, change.created)
    return written, changed


def rebuild(aggregations: Sequence[Aggregation], entries: list[dict[str, Any]], epoch: int = 0) -> PartitionAggregates:
    """The aggregations of one partition recomputed from its table entries (after a rebalance).

    `epoch` must be later than any earlier rebuild of the partition (by any worker): the
    caller passes the wall-clock time.
    """
    agg = PartitionAggregates(epoch, {a.name: a.new() for a in aggregations})
    for entry in entries:
        for a in aggregations:
            a.apply(agg.parts[a.name], None, entry.get("state"), entry.get("created"))
    return agg


class BadUpdate(EventsError, ValueError):
    """A stage-2 message that is not an update stage 1 could have sent (poison)."""


def parse_update(key: bytes | None, value: bytes | None, aggregation: Aggregation) -> tuple[str, dict[str, Any]]:
    """Key and update of a repartition message; BadUpdate naming what is wrong otherwise."""
    if not key:
        raise BadUpdate("update has no key")
    try:
        text_key = key.decode()
        update = json.loads(value or b"")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadUpdate(f"update is not UTF-8 JSON: {exc}") from None
    if not isinstance(update, dict):
        raise BadUpdate(f"update is a {type(update).__name__}, not an object")
    update.setdefault("epoch", 0)  # updates sent before epochs existed
    for name in ("p", "epoch", "version"):
        if not is_int(update.get(name)) or update[name] < 0:
            raise BadUpdate(f"update field {name!r} must be a non-negative integer, got {update.get(name)!r:.40}")
    problem = aggregation.problem(text_key, update.get("value"))
    if problem is not None:
        raise BadUpdate(problem)
    return text_key, update


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON's true is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def merge_part(stored: dict[str, Any] | None, partition: int, epoch: int, version: int,
               value: Any) -> dict[str, Any] | None:
    """Stage 2: the stored parts with one source partition's absolute value; None if stale.

    A part is replaced by one of a later (epoch, version); an equal one re-states it.
    """
    parts = dict((stored or {}).get("parts", {}))
    current = parts.get(str(partition))
    if current is not None and (current.get("epoch", 0), current["version"]) > (epoch, version):
        return None
    parts[str(partition)] = {"epoch": epoch, "version": version, "value": value}
    return {"parts": parts}


def present_count(stored: dict[str, Any]) -> int:
    """A counted aggregation (`count_by`, `window_count`): the sum of the parts."""
    return sum(part["value"] or 0 for part in stored.get("parts", {}).values())


def present_state(stored: dict[str, Any]) -> State | None:
    """A latest-state table as readers see it: the state, or None for a deleted key."""
    return stored.get("state")

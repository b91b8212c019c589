"""Materialized-view logic as pure functions: applying events and deriving aggregates.

The views are built in two stages so every one of them is idempotent:

1. `orders` (key: order id) keeps each order's latest state and the `sequence` that produced
   it. An event whose sequence is not newer changes nothing. A delete keeps a tombstone
   (`state: None`) so a late, older event cannot resurrect the order; the web hides it.
2. Aggregates keyed differently (`customer_orders` by customer, `orders_by_status` by status,
   `orders_per_minute` by window) are fed through repartition topics with *absolute* values
   per source partition — "partition 2 holds 5 paid orders, as of offset 812" — instead of
   deltas. Stage 1 derives them from its `orders` table (and rebuilds them from it after a
   rebalance), stage 2 keeps the newest value per source partition and sums the parts. A
   duplicate or replayed message re-states a value; it can never count twice.

   "Newest" is ordered by (epoch, offset). The epoch is the wall-clock time at which stage 1
   rebuilt the partition's aggregates from its table: after a crash, the new owner re-reads
   events the old one had already handled, and its rebuilt values (from the table, so
   complete) carry lower offsets than the old owner's last updates. Ordered by offset alone
   they would be dropped as stale, and an update the old owner never got to send before it
   died would stay missing (seen by the fault-injection suite: a status count one short).
   This assumes the workers' clocks agree to within a takeover (the 10 s session timeout at
   least): a worker whose clock is further behind would have its updates dropped as stale.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

State = dict[str, Any]
MINUTE = 60
WINDOW_KEEP = 3600


@dataclass(frozen=True)
class OrderChange:
    """One applied change of an order: its state before and after (None = absent/deleted)."""

    key: str
    before: State | None
    after: State | None
    created: int | None = None  # creation time (epoch µs) when this change first saw the order


def apply_order(key: str, stored: dict[str, Any] | None, sequence: int, state: State | None,
                partition: int) -> tuple[dict[str, Any], OrderChange] | None:
    """The new `orders` entry for an event and the change it makes; None if not newer.

    The entry keeps the creation time even as a tombstone: `orders_per_minute` counts
    creations, which a later delete does not undo.
    """
    if stored is not None and stored["seq"] >= sequence:
        return None
    before = stored["state"] if stored is not None else None
    created = stored.get("created") if stored is not None else None
    first_seen = created is None and state is not None
    if first_seen:
        created = micros(state["created_at"])  # type: ignore[index]
    entry = {"seq": sequence, "state": state, "p": partition, "created": created}
    return entry, OrderChange(key, before, state, created if first_seen else None)


def apply_latest(stored: dict[str, Any] | None, sequence: int, state: State | None,
                 partition: int) -> dict[str, Any] | None:
    """The new latest-state entry of a key for an event; None if the event is not newer.

    Any entity's table (`agents/latest.py`): as `apply_order` without the creation time, a
    delete keeps a tombstone (`state: None`) so an older event cannot resurrect the key.
    """
    if stored is not None and stored["seq"] >= sequence:
        return None
    return {"seq": sequence, "state": state, "p": partition}


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


def minute_of(created_at_micros: int) -> int:
    """Start (epoch seconds) of the 60 s tumbling window holding a creation time."""
    seconds = created_at_micros // 1_000_000
    return seconds - seconds % MINUTE


@dataclass
class PartitionAggregates:
    """Aggregates of the orders of one source partition, derived from the `orders` table."""

    # When these aggregates were rebuilt from the table (ns since the epoch): orders updates.
    epoch: int = 0
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    minutes: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, state: State, sign: int) -> tuple[str, str]:
        """Count `state` in (sign=1) or out (sign=-1) of the customer and status aggregates."""
        customer = str(state["customer_id"])
        agg = self.customers.setdefault(customer, {"count": 0, "totals": {}, "created": []})
        agg["count"] += sign
        totals = agg["totals"]
        totals[state["currency"]] = totals.get(state["currency"], 0) + sign * state["amount_cents"]
        if not totals[state["currency"]]:
            del totals[state["currency"]]
        created = micros(state["created_at"])
        if sign > 0:
            agg["created"].append(created)
        elif created in agg["created"]:
            agg["created"].remove(created)
        if agg["count"] == 0:
            del self.customers[customer]
        self.statuses[state["status"]] += sign
        return customer, state["status"]

    def apply(self, change: OrderChange) -> tuple[set[str], set[str], set[int]]:
        """Move one order from its before- to its after-state; the keys whose values changed."""
        customers: set[str] = set()
        statuses: set[str] = set()
        minutes: set[int] = set()
        before, after = change.before, change.after
        for state, sign in ((before, -1), (after, 1)):
            if state is not None:
                customer, status = self.add(state, sign)
                customers.add(customer)
                statuses.add(status)
        # Only keys whose value really changed are re-stated downstream (fewer sends).
        if before is not None and after is not None:
            if before["status"] == after["status"]:
                statuses.clear()
            if all(before[f] == after[f] for f in ("customer_id", "currency", "amount_cents", "created_at")):
                customers.clear()
        if change.created is not None:
            minute = minute_of(change.created)
            self.minutes[minute] += 1
            minutes.add(minute)
        return customers, statuses, minutes

    def customer_value(self, customer: str) -> dict[str, Any] | None:
        """This partition's part of `customer_orders[customer]` (None: no orders here)."""
        agg = self.customers.get(customer)
        if agg is None:
            return None
        return {"count": agg["count"], "total_cents": dict(agg["totals"]),
                "last_order_at": max(agg["created"]) if agg["created"] else None}


@dataclass
class BatchChange:
    """What a stage-1 batch changed in one source partition's aggregates: the keys to re-state
    downstream, with the offset of the batch's last event of the partition as version."""

    agg: PartitionAggregates
    version: int
    customers: set[str]
    statuses: set[str]
    minutes: set[int]


#: One stage-1 input: (partition, offset, decoded record or None for poison, the caller's tag).
BatchItem = tuple[int, int, "State | None", Any]


def apply_batch(aggregates: dict[int, PartitionAggregates], lookup: Callable[[str], dict[str, Any] | None],
                entries_of: Callable[[int], list[dict[str, Any]]], items: list[BatchItem],
                epoch: Callable[[], int]) -> tuple[dict[str, tuple[Any, dict[str, Any]]], dict[int, BatchChange]]:
    """Stage 1 for a batch, without I/O: the `orders` entries to write once each (with the tag
    of the item that last changed each) and, per partition, the aggregate keys to re-state.

    Equal to applying the items one at a time and keeping the last write of each key: later
    items read the batch's own writes, and the aggregates are absolute values.
    """
    written: dict[str, tuple[Any, dict[str, Any]]] = {}
    changed: dict[int, BatchChange] = {}
    for p, offset, record, tag in items:
        agg = aggregates.get(p)
        if agg is None:
            # A new epoch: these values replace whatever an earlier owner sent (see above).
            # The table holds every earlier batch's writes; none of this batch's is of `p`.
            agg = aggregates[p] = rebuild(entries_of(p), epoch=epoch())
            changed[p] = BatchChange(agg, offset, set(agg.customers), set(agg.statuses), set(agg.minutes))
        if record is None:
            continue  # poison: dead-lettered by the down-converter
        key = record["key"]
        current = written[key][1] if key in written else lookup(key)
        applied = apply_order(key, current, record["sequence"], plain_state(record["data"]), p)
        if applied is None:
            continue  # a duplicate or an older event: changes nothing
        entry, change = applied
        written[key] = (tag, entry)
        customers, statuses, minutes = agg.apply(change)
        part = changed.get(p)
        if part is None:
            changed[p] = BatchChange(agg, offset, customers, statuses, minutes)
        else:
            part.version = offset
            part.customers |= customers
            part.statuses |= statuses
            part.minutes |= minutes
    return written, changed


def rebuild(entries: list[dict[str, Any]], epoch: int = 0) -> PartitionAggregates:
    """Aggregates of one partition recomputed from its `orders` entries (after a rebalance).

    `epoch` must be later than any earlier rebuild of the partition (by any worker): the
    caller passes the wall-clock time.
    """
    aggregates = PartitionAggregates(epoch=epoch)
    for entry in entries:
        if entry.get("state") is not None:
            aggregates.add(entry["state"], 1)
        if entry.get("created") is not None:
            aggregates.minutes[minute_of(entry["created"])] += 1
    return aggregates


class BadUpdate(ValueError):
    """A stage-2 message that is not an update stage 1 could have sent (poison)."""


def parse_update(key: bytes | None, value: bytes | None, kind: str,
                 statuses: Collection[str] = ()) -> tuple[str, dict[str, Any]]:
    """Key and update of a repartition message; BadUpdate naming what is wrong otherwise.

    `kind` is "customer" (key: a customer id; value: count, totals, last order time, or
    null), "status" (key: one of `statuses`; value: an int) or "minute" (key: an epoch
    second; value: an int).
    """
    if not key:
        raise BadUpdate("update has no key")
    try:
        text_key = key.decode()
        update = json.loads(value or b"")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadUpdate(f"update is not UTF-8 JSON: {exc}") from None
    if kind in ("minute", "customer") and not text_key.isdigit():
        raise BadUpdate(f"{kind} key {text_key[:40]!r} is not an integer")
    if kind == "status" and text_key not in statuses:
        raise BadUpdate(f"status key {text_key[:40]!r} is not one of {sorted(statuses)}")
    if not isinstance(update, dict):
        raise BadUpdate(f"update is a {type(update).__name__}, not an object")
    update.setdefault("epoch", 0)  # updates sent before epochs existed
    for name in ("p", "epoch", "version"):
        if not _is_int(update.get(name)) or update[name] < 0:
            raise BadUpdate(f"update field {name!r} must be a non-negative integer, got {update.get(name)!r:.40}")
    part = update.get("value")
    if kind == "customer":
        ok = part is None or (isinstance(part, dict) and _is_int(part.get("count"))
                              and isinstance(part.get("total_cents"), dict)
                              and all(isinstance(c, str) and _is_int(v) for c, v in part["total_cents"].items())
                              and (part.get("last_order_at") is None or _is_int(part["last_order_at"])))
    else:
        ok = _is_int(part)
    if not ok:
        raise BadUpdate(f"update value {part!r:.60} is not a {kind} aggregate")
    return text_key, update


def _is_int(value: Any) -> bool:
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


def present_customer(stored: dict[str, Any]) -> dict[str, Any] | None:
    """`customer_orders` as readers see it: count, totals per currency, last order time."""
    count, totals, last = 0, {}, None
    for part in stored.get("parts", {}).values():
        value = part["value"]
        if value is None:
            continue
        count += value["count"]
        for currency, cents in value["total_cents"].items():
            totals[currency] = totals.get(currency, 0) + cents
        if value["last_order_at"] is not None:
            last = max(last or 0, value["last_order_at"])
    if count == 0:
        return None
    return {"count": count, "total_cents": totals, "last_order_at": last}


def present_count(stored: dict[str, Any]) -> int:
    """A counted view (`orders_by_status`, `orders_per_minute`): the sum of the parts."""
    return sum(part["value"] or 0 for part in stored.get("parts", {}).values())


def present_state(stored: dict[str, Any]) -> State | None:
    """A latest-state table as readers see it: the state, or None for a deleted key."""
    return stored.get("state")


#: `orders`, the latest-state table stage 1 keeps with its creation times, reads the same.
present_order = present_state

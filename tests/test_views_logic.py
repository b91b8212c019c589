"""View logic as pure functions: idempotence under duplicates, replays and reordering."""
from __future__ import annotations

import json
import random
from typing import Any

import pytest

from app.views import (
    BadUpdate,
    BatchChange,
    BatchItem,
    PartitionAggregates,
    apply_batch,
    apply_latest,
    apply_order,
    merge_part,
    minute_of,
    present_count,
    parse_update,
    present_customer,
    present_state,
    rebuild,
)

T = 1_795_760_000_000_000  # epoch µs


def order(oid: int, customer: int = 1, cents: int = 100, currency: str = "EUR", status: str = "pending",
          created: int = T) -> dict[str, Any]:
    return {"id": oid, "customer_id": customer, "amount_cents": cents, "currency": currency,
            "status": status, "created_at": created, "updated_at": created, "shipping": None}


def run(events: list[tuple[str, int, dict[str, Any] | None]]) -> tuple[dict[str, Any], PartitionAggregates]:
    table: dict[str, Any] = {}
    agg = PartitionAggregates()
    for key, seq, state in events:
        applied = apply_order(key, table.get(key), seq, state, 0)
        if applied is not None:
            table[key], change = applied
            agg.apply(change)
    return table, agg


def test_duplicate_or_older_event_changes_nothing() -> None:
    table, _ = run([("1", 1, order(1)), ("1", 2, order(1, status="paid"))])
    assert apply_order("1", table["1"], 2, order(1, status="paid"), 0) is None
    assert apply_order("1", table["1"], 1, order(1), 0) is None


def test_any_entitys_latest_state_takes_only_newer_events_and_keeps_tombstones() -> None:
    entry = apply_latest(None, 1, {"id": 5, "name": "Ada"}, 2)
    assert entry == {"seq": 1, "state": {"id": 5, "name": "Ada"}, "p": 2}
    assert apply_latest(entry, 1, {"id": 5, "name": "again"}, 2) is None  # a duplicate
    gone = apply_latest(entry, 3, None, 2)
    assert gone == {"seq": 3, "state": None, "p": 2} and present_state(gone) is None
    assert apply_latest(gone, 2, {"id": 5, "name": "late"}, 2) is None  # no resurrection


def test_delete_keeps_a_tombstone_so_old_events_cannot_resurrect() -> None:
    table, agg = run([("1", 1, order(1)), ("1", 2, None), ("1", 1, order(1))])
    assert table["1"]["state"] is None and table["1"]["created"] == T
    assert agg.customers == {} and agg.statuses["pending"] == 0


def test_status_change_moves_one_count_once() -> None:
    events = [("1", 1, order(1)), ("1", 2, order(1, status="paid"))]
    _, agg = run(events + events + events[::-1])
    assert agg.statuses["pending"] == 0 and agg.statuses["paid"] == 1


def test_customer_aggregate_counts_totals_and_last_order() -> None:
    _, agg = run([("1", 1, order(1, cents=100)), ("2", 1, order(2, cents=250, created=T + 5)),
                  ("3", 1, order(3, cents=7, currency="USD")), ("3", 2, None)])
    assert agg.customer_value("1") == {"count": 2, "total_cents": {"EUR": 350}, "last_order_at": T + 5}


def test_deleting_an_order_does_not_uncount_its_creation_minute() -> None:
    _, agg = run([("1", 1, order(1)), ("1", 2, None)])
    assert agg.minutes[minute_of(T)] == 1


def test_rebuild_from_the_table_equals_incremental_aggregates() -> None:
    rng = random.Random(7)
    events, seqs = [], {}
    for _ in range(2000):
        key = str(rng.randrange(60))
        seqs[key] = seqs.get(key, 0) + 1
        state = None if rng.random() < 0.1 else order(int(key), customer=rng.randrange(5),
                                                       cents=rng.randrange(1000), status=rng.choice(
                                                           ["pending", "paid", "shipped"]),
                                                       created=T + int(key) * 60_000_000)
        events.append((key, seqs[key], state))
    replayed = events + rng.sample(events, 500)  # duplicates and stale events mixed in
    table, agg = run(replayed)
    rebuilt = rebuild(list(table.values()))
    assert {c: rebuilt.customer_value(c) for c in rebuilt.customers} == {
        c: agg.customer_value(c) for c in agg.customers}
    assert {k: v for k, v in rebuilt.statuses.items() if v} == {k: v for k, v in agg.statuses.items() if v}
    assert dict(rebuilt.minutes) == dict(agg.minutes)


def test_merge_keeps_newest_absolute_value_per_partition() -> None:
    stored = merge_part(None, 0, 0, 10, 3)
    stored = merge_part(stored, 1, 0, 4, 2)
    assert stored is not None and present_count(stored) == 5
    assert merge_part(stored, 0, 0, 9, 99) is None  # older version of partition 0
    again = merge_part(stored, 0, 0, 10, 3)  # a replayed duplicate re-states the same value
    assert again is not None and present_count(again) == 5


def test_a_rebuild_after_takeover_replaces_the_dead_owners_later_offsets() -> None:
    # The old owner sent partition 0's count as of offset 50, then died before sending the
    # update of offset 51. The new owner rebuilds from the table (which has offset 51's
    # order) while re-reading from the committed offset 40: a lower offset, a later epoch.
    old_owner = merge_part(None, 0, 1_000, 50, 7)
    rebuilt = merge_part(old_owner, 0, 2_000, 40, 8)
    assert rebuilt is not None and present_count(rebuilt) == 8
    # An update of the old owner still in flight arrives late: its epoch makes it stale.
    assert merge_part(rebuilt, 0, 1_000, 51, 6) is None


def test_present_customer_sums_parts_and_hides_empty() -> None:
    stored = merge_part(None, 0, 0, 1, {"count": 1, "total_cents": {"EUR": 5}, "last_order_at": T})
    stored = merge_part(stored, 1, 0, 1, {"count": 2, "total_cents": {"EUR": 1, "USD": 2}, "last_order_at": T + 1})
    assert stored is not None
    assert present_customer(stored) == {"count": 3, "total_cents": {"EUR": 6, "USD": 2}, "last_order_at": T + 1}
    emptied = merge_part(merge_part(stored, 0, 0, 2, None), 1, 0, 2, None)
    assert emptied is not None and present_customer(emptied) is None


def test_parse_update_names_what_is_wrong_with_poison() -> None:
    good = b'{"p": 1, "version": 7, "value": {"count": 2, "total_cents": {"EUR": 5}, "last_order_at": 9}}'
    assert parse_update(b"42", good, "customer") == ("42", {**json.loads(good), "epoch": 0})
    assert parse_update(b"60", b'{"p": 0, "version": 1, "value": 3}', "minute")[0] == "60"
    assert parse_update(b"paid", b'{"p": 0, "version": 1, "value": 3}', "status", {"paid"})[0] == "paid"
    cases = [
        (None, good, "customer", "no key"),
        (b"42", b"{not json", "customer", "not UTF-8 JSON"),
        (b"42", b"\xc1\xff", "customer", "not UTF-8 JSON"),
        (b"42", b"null", "customer", "NoneType, not an object"),
        (b"42", b'{"x": 1}', "minute", "'p' must be a non-negative integer"),
        (b"42", b'{"p": "zero", "version": 1, "value": 1}', "minute", "'p'"),
        (b"42", b'{"p": 0, "version": true, "value": 1}', "minute", "'version'"),
        (b"42", b'{"p": 0, "version": 1, "value": {}}', "minute", "not a minute aggregate"),
        (b"bogus", b'{"p": 0, "version": 1, "value": 1}', "status", "not one of"),
        (b"x7", b'{"p": 0, "version": 1, "value": null}', "customer", "not an integer"),
        (b"42", b'{"p": 0, "version": 1, "value": {"count": 1}}', "customer", "not a customer aggregate"),
        (b"not-a-number", b'{"p": 0, "version": 1, "value": 1}', "minute", "not an integer"),
    ]
    for key, value, kind, message in cases:
        with pytest.raises(BadUpdate, match=message):
            parse_update(key, value, kind)


def _stage2(changed: dict[int, BatchChange], views: dict[str, dict[str, Any]]) -> None:
    """Send what stage 1 would, and merge it as stage 2 does (epoch fixed: one owner)."""
    for p, part in changed.items():
        sends = [("customer", c, part.agg.customer_value(c)) for c in part.customers]
        sends += [("status", s, part.agg.statuses.get(s, 0)) for s in part.statuses]
        sends += [("minute", str(m), part.agg.minutes.get(m, 0)) for m in part.minutes]
        for kind, key, value in sends:
            merged = merge_part(views[kind].get(key), p, part.agg.epoch, part.version, value)
            if merged is not None:
                views[kind][key] = merged


def _feed(items: list[BatchItem], batch_size: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Stage 1 and 2 over `items` in batches of `batch_size`: the orders table and the views."""
    orders: dict[str, Any] = {}
    aggregates: dict[int, PartitionAggregates] = {}
    views: dict[str, dict[str, Any]] = {"customer": {}, "status": {}, "minute": {}}
    for i in range(0, len(items), batch_size):
        written, changed = apply_batch(
            aggregates, orders.get, lambda p: [v for v in orders.values() if v["p"] == p],
            items[i:i + batch_size], lambda: 1)
        for key, (_, entry) in written.items():
            orders[key] = entry
        _stage2(changed, views)
    presented = {
        "customer": {k: present_customer(v) for k, v in views["customer"].items()},
        "status": {k: present_count(v) for k, v in views["status"].items()},
        "minute": {k: present_count(v) for k, v in views["minute"].items()},
    }
    return orders, presented


def test_one_batch_of_a_keys_whole_life_equals_applying_its_events_one_by_one() -> None:
    # One key's life, and two neighbours of the same customer, in one partition and one batch:
    # create, updates, status changes, a duplicate, an old event, delete, re-create; poison too.
    events: list[tuple[str, int, dict[str, Any] | None]] = [
        ("1", 1, order(1, customer=5)), ("2", 1, order(2, customer=5, cents=40)),
        ("1", 2, order(1, customer=5, status="paid")), ("1", 2, order(1, customer=5, status="paid")),
        ("1", 3, order(1, customer=5, status="shipped", cents=120)), ("1", 1, order(1, customer=5)),
        ("2", 2, order(2, customer=5, cents=40, status="cancelled")), ("1", 4, None),
        ("1", 5, order(1, customer=5, cents=7, currency="USD", created=T + 61_000_000)),
        ("3", 1, order(3, customer=6, created=T + 61_000_000)),
        ("3", 2, order(3, customer=6, status="paid", created=T + 61_000_000)),
    ]
    items: list[BatchItem] = []
    for offset, (key, seq, state) in enumerate(events):
        items.append((0, offset, {"key": key, "sequence": seq, "data": state}, offset))
        if offset == 4:
            items.append((0, 100 + offset, None, "poison"))  # undecodable: skipped, never applied
    one_by_one = _feed(items, 1)
    batched = _feed(items, len(items))
    assert batched == one_by_one
    orders, views = batched
    assert orders["1"]["seq"] == 5 and orders["1"]["state"]["currency"] == "USD"
    assert views["status"] == {"pending": 1, "paid": 1, "shipped": 0, "cancelled": 1}
    assert views["customer"]["5"] == {"count": 2, "total_cents": {"EUR": 40, "USD": 7}, "last_order_at": T + 61_000_000}
    # Each key once, in the minute of its first creation (the re-created order 1 is not again).
    assert views["minute"] == {str(minute_of(T)): 2, str(minute_of(T + 61_000_000)): 1}


def test_a_batch_writes_each_key_once_with_the_tag_of_its_last_change() -> None:
    items: list[BatchItem] = [(p, o, {"key": k, "sequence": s, "data": order(int(k))}, f"e{o}")
                              for p, o, k, s in [(0, 0, "1", 1), (1, 0, "2", 1), (0, 1, "1", 2), (0, 2, "1", 1)]]
    written, changed = apply_batch({}, lambda key: None, lambda p: [], items, lambda: 7)
    assert {k: (tag, entry["seq"], entry["p"]) for k, (tag, entry) in written.items()} == {
        "1": ("e1", 2, 0), "2": ("e0", 1, 1)}
    # The version of a partition's re-stated keys: its last event of the batch that changed one.
    assert {p: (c.version, c.agg.epoch) for p, c in changed.items()} == {0: (1, 7), 1: (0, 7)}

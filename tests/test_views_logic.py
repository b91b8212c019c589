"""View logic as pure functions: idempotence under duplicates, replays and reordering, for the
orders' declared aggregations and for declarations any entity could make."""
from __future__ import annotations

import json
import random
from typing import Any

import pytest

from app.aggregations import count_by, sum_by, window_count
from app.views import (
    Aggregation,
    BadUpdate,
    BatchChange,
    BatchItem,
    PartitionAggregates,
    apply_batch,
    apply_event,
    merge_part,
    parse_update,
    present_count,
    present_state,
    rebuild,
)
from app.wire.schemas import load
from models.order import CUSTOMER_ORDERS, ORDERS_BY_STATUS, ORDERS_PER_MINUTE, Order

T = 1_795_760_000_000_000  # epoch µs
#: The orders' aggregations, checked against orders-v2 as the worker binds them.
FIELDS = load("orders", 2).data_fields()
BY_CUSTOMER, BY_STATUS, PER_MINUTE = (a.bind(FIELDS) for a in Order.__aggregations__)
ORDERS: tuple[Aggregation, ...] = (BY_CUSTOMER, BY_STATUS, PER_MINUTE)


def order(oid: int, customer: int = 1, cents: int = 100, currency: str = "EUR", status: str = "pending",
          created: int = T) -> dict[str, Any]:
    return {"id": oid, "customer_id": customer, "amount_cents": cents, "currency": currency,
            "status": status, "created_at": created, "updated_at": created, "shipping": None}


def run(events: list[tuple[str, int, dict[str, Any] | None]],
        aggregations: tuple[Aggregation, ...] = ORDERS) -> tuple[dict[str, Any], PartitionAggregates]:
    """Apply events one at a time: the table and partition 0's aggregation states."""
    table: dict[str, Any] = {}
    agg = rebuild(aggregations, [])
    time = "created_at" if any(a.window for a in aggregations) else None
    for key, seq, state in events:
        applied = apply_event(key, table.get(key), seq, state, 0, time)
        if applied is not None:
            table[key], change = applied
            for a in aggregations:
                a.apply(agg.parts[a.name], change.before, change.after, change.created)
    return table, agg


def values(aggregation: Aggregation, agg: PartitionAggregates) -> dict[str, Any]:
    part = agg.parts[aggregation.name]
    return {k: aggregation.value(part, k) for k in aggregation.keys(part)}


def test_the_orders_aggregations_are_the_three_declared_beside_the_model() -> None:
    assert [a.name for a in Order.__aggregations__] == ["customer_orders", "orders_by_status", "orders_per_minute"]
    assert Order.__aggregations__ == (CUSTOMER_ORDERS, ORDERS_BY_STATUS, ORDERS_PER_MINUTE)


def test_duplicate_or_older_event_changes_nothing() -> None:
    table, _ = run([("1", 1, order(1)), ("1", 2, order(1, status="paid"))])
    assert apply_event("1", table["1"], 2, order(1, status="paid"), 0, "created_at") is None
    assert apply_event("1", table["1"], 1, order(1), 0, "created_at") is None


def test_any_entitys_latest_state_takes_only_newer_events_and_keeps_tombstones() -> None:
    entry, _ = apply_event("5", None, 1, {"id": 5, "name": "Ada"}, 2) or (None, None)
    assert entry == {"seq": 1, "state": {"id": 5, "name": "Ada"}, "p": 2}
    assert apply_event("5", entry, 1, {"id": 5, "name": "again"}, 2) is None  # a duplicate
    gone, _ = apply_event("5", entry, 3, None, 2) or (None, None)
    assert gone == {"seq": 3, "state": None, "p": 2} and present_state(gone) is None
    assert apply_event("5", gone, 2, {"id": 5, "name": "late"}, 2) is None  # no resurrection


def test_delete_keeps_a_tombstone_so_old_events_cannot_resurrect() -> None:
    table, agg = run([("1", 1, order(1)), ("1", 2, None), ("1", 1, order(1))])
    assert table["1"]["state"] is None and table["1"]["created"] == T
    assert values(BY_CUSTOMER, agg) == {} and values(BY_STATUS, agg) == {"pending": 0}


def test_status_change_moves_one_count_once() -> None:
    events = [("1", 1, order(1)), ("1", 2, order(1, status="paid"))]
    _, agg = run(events + events + events[::-1])
    assert values(BY_STATUS, agg) == {"pending": 0, "paid": 1}


def test_customer_aggregate_counts_totals_and_last_order() -> None:
    _, agg = run([("1", 1, order(1, cents=100)), ("2", 1, order(2, cents=250, created=T + 5)),
                  ("3", 1, order(3, cents=7, currency="USD")), ("3", 2, None)])
    assert values(BY_CUSTOMER, agg) == {"1": {"count": 2, "total_cents": {"EUR": 350}, "last_order_at": T + 5}}


def test_deleting_an_order_does_not_uncount_its_creation_minute() -> None:
    _, agg = run([("1", 1, order(1)), ("1", 2, None)])
    assert values(PER_MINUTE, agg) == {str(PER_MINUTE.start(T)): 1}


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
    rebuilt = rebuild(ORDERS, list(table.values()))
    for a in ORDERS:
        assert {k: v for k, v in values(a, rebuilt).items() if v} == {k: v for k, v in values(a, agg).items() if v}


def test_a_new_entitys_declarations_count_sum_and_regroup_by_any_field() -> None:
    # A product catalogue: count per category (a plain string), stock summed per supplier
    # with no split, and the latest restock time.
    by_category = count_by("products_by_category", "category")
    stock = sum_by("supplier_stock", key="supplier", sums={"units": "stock"}, latest={"last_restock": "restocked_at"})
    both: tuple[Aggregation, ...] = (by_category, stock)

    def product(category: str, supplier: str, units: int, at: int) -> dict[str, Any]:
        return {"category": category, "supplier": supplier, "stock": units, "restocked_at": at}

    _, agg = run([("a", 1, product("tools", "acme", 5, 10)), ("b", 1, product("tools", "acme", 7, 30)),
                  ("c", 1, product("toys", "zeta", 1, 20)), ("b", 2, product("toys", "zeta", 7, 30)),
                  ("c", 2, None), ("c", 1, product("toys", "zeta", 1, 20))], both)
    assert values(by_category, agg) == {"tools": 1, "toys": 1}
    assert values(stock, agg) == {"acme": {"count": 1, "units": 5, "last_restock": 10},
                                  "zeta": {"count": 1, "units": 7, "last_restock": 30}}
    stored = merge_part(merge_part(None, 0, 0, 1, values(stock, agg)["zeta"]), 1, 0, 1,
                        {"count": 2, "units": 3, "last_restock": 25})
    assert stock.present(stored or {}) == {"count": 3, "units": 10, "last_restock": 30}


def test_a_declaration_naming_what_the_schema_lacks_is_refused_in_one_line() -> None:
    assert ORDERS_BY_STATUS.problems(FIELDS) == []
    assert count_by("x", "stauts").problems(FIELDS) == [
        "aggregation 'x': 'stauts' is not a field of the entity's schema (fields: amount_cents, created_at, "
        "currency, customer_id, id, shipping, status, updated_at)"]
    assert sum_by("y", key="customer_id", sums={"t": "currency"}).problems(FIELDS) == [
        "aggregation 'y': field 'currency' is string, not one of int, long"]
    with pytest.raises(ValueError, match="window_count 'z': size must be > 0"):
        window_count("z", time="created_at", size=0)


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
    assert BY_CUSTOMER.present(stored) == {"count": 3, "total_cents": {"EUR": 6, "USD": 2}, "last_order_at": T + 1}
    emptied = merge_part(merge_part(stored, 0, 0, 2, None), 1, 0, 2, None)
    assert emptied is not None and BY_CUSTOMER.present(emptied) is None


def test_parse_update_names_what_is_wrong_with_poison() -> None:
    good = b'{"p": 1, "version": 7, "value": {"count": 2, "total_cents": {"EUR": 5}, "last_order_at": 9}}'
    assert parse_update(b"42", good, BY_CUSTOMER) == ("42", {**json.loads(good), "epoch": 0})
    assert parse_update(b"60", b'{"p": 0, "version": 1, "value": 3}', PER_MINUTE)[0] == "60"
    assert parse_update(b"paid", b'{"p": 0, "version": 1, "value": 3}', BY_STATUS)[0] == "paid"
    cases = [
        (None, good, BY_CUSTOMER, "no key"),
        (b"42", b"{not json", BY_CUSTOMER, "not UTF-8 JSON"),
        (b"42", b"\xc1\xff", BY_CUSTOMER, "not UTF-8 JSON"),
        (b"42", b"null", BY_CUSTOMER, "NoneType, not an object"),
        (b"42", b'{"x": 1}', PER_MINUTE, "'p' must be a non-negative integer"),
        (b"42", b'{"p": "zero", "version": 1, "value": 1}', PER_MINUTE, "'p'"),
        (b"42", b'{"p": 0, "version": true, "value": 1}', PER_MINUTE, "'version'"),
        (b"42", b'{"p": 0, "version": 1, "value": {}}', PER_MINUTE, "not a count of orders_per_minute"),
        (b"bogus", b'{"p": 0, "version": 1, "value": 1}', BY_STATUS, "not one of"),
        (b"x7", b'{"p": 0, "version": 1, "value": null}', BY_CUSTOMER, "not an integer"),
        (b"42", b'{"p": 0, "version": 1, "value": {"count": 1}}', BY_CUSTOMER, "not a value of customer_orders"),
        (b"not-a-number", b'{"p": 0, "version": 1, "value": 1}', PER_MINUTE, "not an integer"),
    ]
    for key, value, aggregation, message in cases:
        with pytest.raises(BadUpdate, match=message):
            parse_update(key, value, aggregation)


def _stage2(changed: dict[int, BatchChange], views: dict[str, dict[str, Any]]) -> None:
    """Send what stage 1 would, and merge it as stage 2 does (epoch fixed: one owner)."""
    for p, part in changed.items():
        for a in ORDERS:
            for key in part.keys[a.name]:
                value = a.value(part.agg.parts[a.name], key)
                merged = merge_part(views[a.name].get(key), p, part.agg.epoch, part.version, value)
                if merged is not None:
                    views[a.name][key] = merged


def _feed(items: list[BatchItem], batch_size: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Stage 1 and 2 over `items` in batches of `batch_size`: the orders table and the views."""
    orders: dict[str, Any] = {}
    aggregates: dict[int, PartitionAggregates] = {}
    views: dict[str, dict[str, Any]] = {a.name: {} for a in ORDERS}
    for i in range(0, len(items), batch_size):
        written, changed = apply_batch(
            ORDERS, aggregates, orders.get, lambda p: [v for v in orders.values() if v["p"] == p],
            items[i:i + batch_size], lambda: 1)
        for key, (_, entry) in written.items():
            orders[key] = entry
        _stage2(changed, views)
    presented = {a.name: {k: a.present(v) for k, v in views[a.name].items()} for a in ORDERS}
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
    assert views["orders_by_status"] == {"pending": 1, "paid": 1, "shipped": 0, "cancelled": 1}
    assert views["customer_orders"]["5"] == {"count": 2, "total_cents": {"EUR": 40, "USD": 7},
                                             "last_order_at": T + 61_000_000}
    # Each key once, in the minute of its first creation (the re-created order 1 is not again).
    assert views["orders_per_minute"] == {str(PER_MINUTE.start(T)): 2, str(PER_MINUTE.start(T + 61_000_000)): 1}


def test_a_batch_writes_each_key_once_with_the_tag_of_its_last_change() -> None:
    items: list[BatchItem] = [(p, o, {"key": k, "sequence": s, "data": order(int(k))}, f"e{o}")
                              for p, o, k, s in [(0, 0, "1", 1), (1, 0, "2", 1), (0, 1, "1", 2), (0, 2, "1", 1)]]
    written, changed = apply_batch(ORDERS, {}, lambda key: None, lambda p: [], items, lambda: 7)
    assert {k: (tag, entry["seq"], entry["p"]) for k, (tag, entry) in written.items()} == {
        "1": ("e1", 2, 0), "2": ("e0", 1, 1)}
    # The version of a partition's re-stated keys: its last event of the batch that changed one.
    assert {p: (c.version, c.agg.epoch) for p, c in changed.items()} == {0: (1, 7), 1: (0, 7)}


def test_an_entity_without_aggregations_only_keeps_its_table() -> None:
    items: list[BatchItem] = [(0, 0, {"key": "1", "sequence": 1, "data": {"id": 1}}, "e0")]
    aggregates: dict[int, PartitionAggregates] = {}
    written, changed = apply_batch((), aggregates, lambda key: None, lambda p: [], items, lambda: 7)
    assert written == {"1": ("e0", {"seq": 1, "state": {"id": 1}, "p": 0})}
    assert changed == {} and aggregates == {}

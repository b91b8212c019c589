"""The chaos checker, fed histories known to be broken: it must report each, on the right row.

Every figure of the reliability table rests on these functions; a checker that cannot see a
lost event would report zero lost whatever happened.
"""
from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from app.cache import encode_entry
from app.views import micros
from chaos.agreement import Snapshot, check_invoices, order_matches, orders_per_minute, v1_matches, view_mismatches
from chaos.checker import Checker, Report, convertible
from chaos.copies import check_copies, in_order
from chaos.metrics import COMMITS_PAST_UNACKED, count_over, sample_sum
from chaos.promises import check_topic
from chaos.topiclog import Seen
from models.order import ORDERS_PER_MINUTE

NOW = datetime.now(timezone.utc).replace(second=10, microsecond=0)


def event(key: str, sequence: int, *, offset: int, event_id: str | None = None, partition: int = 0,
          amount: int = 100, created: datetime = NOW, deleted: bool = False) -> Seen:
    """One decoded orders-v2 message."""
    data = None if deleted else {"amount_cents": amount, "created_at": created, "customer_id": 1,
                                 "currency": "EUR", "status": "pending"}
    return Seen(partition, offset, key, event_id or f"{key}-{sequence}", sequence, data)


def history(key: str, n: int, start: int = 0) -> list[Seen]:
    """Events 1..n of one key, in order, one per offset."""
    return [event(key, s, offset=start + s) for s in range(1, n + 1)]


def test_a_clean_history_with_duplicates_keeps_every_promise() -> None:
    events = history("1", 3) + [event("1", 2, offset=9)]  # a redelivered copy: same id
    check = check_topic("orders-v2", events, {"1": 3})
    assert check.ok and (check.events, check.duplicates, check.lost, check.reordered, check.phantom) == (3, 1, 0, 0, 0)


def test_a_lost_sequence_is_reported_with_its_key_and_partition() -> None:
    events = [e for e in history("7", 4) if e.sequence != 3] + history("8", 2, start=10)
    check = check_topic("orders-v2", events, {"7": 4, "8": 2, "9": 2})
    assert not check.ok and check.lost == 1 + 2  # key 7's sequence 3; key 9 has no event at all
    assert check.examples == ["orders-v2 key 7 lost sequences [3] (partition 0)"]


def test_a_reordered_pair_is_reported() -> None:
    events = [event("5", 1, offset=1), event("5", 3, offset=2), event("5", 2, offset=3)]
    check = check_topic("orders-v2", events, {"5": 3})
    assert not check.ok and check.reordered == 1 and check.lost == 0
    assert check.last["5"].sequence == 3


def test_one_sequence_under_two_event_ids_is_a_phantom() -> None:
    events = history("4", 2) + [event("4", 2, offset=5, event_id="another-id")]
    check = check_topic("orders-v2", events, {"4": 2})
    assert not check.ok and check.split == 1 and check.duplicates == 0


def test_an_event_beyond_the_committed_sequence_is_a_phantom() -> None:
    check = check_topic("orders-v2", history("3", 3), {"3": 2})
    assert not check.ok and check.phantom == 1


def test_a_rolled_back_writes_marker_is_a_phantom() -> None:
    events = history("6", 1) + [event("6", 2, offset=2, amount=-1)]
    check = check_topic("orders-v2", events, {"6": 2})
    assert not check.ok and check.phantom == 1 and check.lost == 0


def test_a_missing_or_wrong_v1_event_is_a_mismatch() -> None:
    row = {"customer_id": 1, "amount_cents": 250, "currency": "EUR", "status": "paid", "shipping": None}
    good = Seen(0, 1, "1", "e", 2, {"amount": 2.5, "status": "paid", "customer_id": 1})
    assert v1_matches(good, row)
    assert not v1_matches(None, row)  # the key has no orders-v1 event
    assert not v1_matches(Seen(0, 1, "1", "e", 2, {"amount": 2.49, "status": "paid", "customer_id": 1}), row)
    assert not v1_matches(Seen(0, 1, "1", "e", 2, None), row)  # deleted on v1, alive in the database
    assert v1_matches(Seen(0, 1, "1", "e", 3, None), None)


# -- orders-v1 against orders-v2: one copy per input, in the input's order, per partition -------

def copies_of(inputs: list[Seen], *, start: int = 100) -> list[Seen]:
    """The orders-v1 copies of `inputs`, in the order given, at offsets from `start`."""
    return [Seen(e.partition, start + i, e.key, e.event_id, e.sequence, {"amount": 1.0}) for i, e in enumerate(inputs)]


def two_partitions() -> list[Seen]:
    """orders-v2: keys 1 and 2 on partition 0, interleaved; key 3 on partition 1."""
    return [event("1", 1, offset=0), event("2", 1, offset=1), event("1", 2, offset=2), event("2", 2, offset=3),
            event("3", 1, offset=0, partition=1), event("3", 2, offset=1, partition=1)]


def test_v1_copies_of_every_v2_event_in_order_keep_the_promise_despite_duplicates() -> None:
    inputs = two_partitions()
    redelivered = inputs[:3] + inputs[1:]  # a takeover re-reads offsets 1 and 2 of partition 0: copies again
    inputs_with_duplicate = inputs + [event("1", 2, offset=7)]  # the relay published one event twice
    check = check_copies(inputs_with_duplicate, copies_of(redelivered))
    assert check.broken == 0 and check.examples == []


def test_a_v2_event_without_its_v1_copy_is_reported_with_its_partition_offset_and_key() -> None:
    inputs = two_partitions()
    check = check_copies(inputs, copies_of([e for e in inputs if (e.key, e.sequence) != ("2", 1)]))
    assert (check.missing, check.reordered, check.unexpected) == (1, 0, 0)
    assert check.examples == ["orders-v1 partition 0: no copy of orders-v2 offset 1 (key 2, sequence 1)"]


def test_a_missing_v1_copy_is_reported_even_when_the_key_has_a_later_one() -> None:
    # The fingerprint of issue 27: a key's sequence 2 missing on v1, sequence 3 present.
    inputs = history("41", 3)
    check = check_copies(inputs, copies_of([inputs[0], inputs[2]]))
    assert check.missing == 1 and check.examples[0].endswith("offset 2 (key 41, sequence 2)")


def test_two_swapped_v1_copies_are_reported_out_of_order() -> None:
    inputs = two_partitions()  # keys 1 and 2 differ: the per-key check would not see this
    swapped = [inputs[0], inputs[2], inputs[1], *inputs[3:]]
    check = check_copies(inputs, copies_of(swapped))
    assert (check.missing, check.reordered, check.unexpected) == (0, 1, 0)
    # Of a swapped pair, the one that came early is named (either would explain it).
    assert check.examples == ["orders-v1 partition 0 offset 101: the copy of orders-v2 offset 2 "
                              "(key 1, sequence 2) is out of order"]
    assert check_topic("orders-v1", copies_of(swapped), {"1": 2, "2": 2, "3": 2}).ok


def test_one_v1_copy_moved_far_is_one_out_of_order_not_all_it_passed() -> None:
    inputs = history("9", 50)
    check = check_copies(inputs, copies_of([inputs[-1], *inputs[:-1]]))
    assert check.reordered == 1 and check.missing == 0
    assert sorted(in_order([4, 0, 1, 2, 3])) == [1, 2, 3, 4] and in_order([]) == set()


def test_a_v1_copy_of_no_v2_event_is_reported() -> None:
    inputs = two_partitions()
    check = check_copies(inputs[:-1], copies_of(inputs))
    assert (check.missing, check.reordered, check.unexpected) == (0, 0, 1)
    assert check.examples == ["orders-v1 partition 1 offset 105 (key 3, sequence 2): a copy of no orders-v2 event"]


def test_copies_are_compared_partition_by_partition() -> None:
    inputs = two_partitions()
    other_partition = [Seen(1 - e.partition, e.offset, e.key, e.event_id, e.sequence, e.data) for e in inputs]
    check = check_copies(inputs, copies_of(other_partition))
    assert check.missing == len(inputs) and check.unexpected == len(inputs)


def test_v2_records_the_down_converter_would_dead_letter_are_not_inputs() -> None:
    valid = convertible("orders-v2", "orders-v1")
    record = {"event_id": "6f1c2d4e-1111-4a2b-9c3d-2e4f5a6b7c8d", "message_version": 1, "schema_version": 2,
              "service": "orders", "entity": "orders", "key": "5", "op": "update", "occurred_at": NOW,
              "sequence": 3, "data": {"id": 5, "customer_id": 9, "amount_cents": 1999, "currency": "EUR",
                                      "status": "paid", "created_at": NOW, "updated_at": NOW, "shipping": None}}
    valid(record)
    with pytest.raises(ValueError, match="schema_version 3"):
        valid({**record, "schema_version": 3})


# -- the workers' own count of commits past an unfinished message ------------------------------

EXPOSITION = f"""# HELP {COMMITS_PAST_UNACKED[:-6]} Commits past an unacked offset.
# TYPE {COMMITS_PAST_UNACKED[:-6]} counter
{COMMITS_PAST_UNACKED}{{topic="orders-v2",partition="0"}} 2.0
{COMMITS_PAST_UNACKED}{{topic="orders-v2",partition="3"}} 1.0
# TYPE mse_ready gauge
mse_ready 1.0
"""


def test_commits_past_unacked_are_summed_over_every_label_set() -> None:
    assert sample_sum(EXPOSITION, COMMITS_PAST_UNACKED) == 3
    assert sample_sum("# TYPE mse_ready gauge\nmse_ready 1.0\n", COMMITS_PAST_UNACKED) is None


async def test_commits_past_unacked_are_summed_over_the_workers_that_export_them() -> None:
    def metrics(body: str) -> Any:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text=body, content_type="text/plain")
        return page

    runners, urls = [], []
    for body in (EXPOSITION, "mse_ready 1.0\n"):  # a worker that does not export the counter yet counts 0
        app = web.Application()
        app.router.add_get("/metrics", metrics(body))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")  # type: ignore[union-attr]
    try:
        counted = await count_over([*urls, "http://127.0.0.1:9"])  # the discard port: nobody answers
    finally:
        for runner in runners:
            await runner.cleanup()
    assert (counted.total, counted.exported_by, counted.unanswered) == (3, 1, 1)


def test_a_commit_past_an_unacked_offset_fails_a_converged_run() -> None:
    converged = Report("f", writes=10, committed=10, converge_s=1.0)
    assert converged.ok
    converged.commits_past_unacked = 1
    assert not converged.ok and "1 commits past unacked" in converged.row()


def test_order_states_are_compared_field_by_field() -> None:
    row = {"customer_id": 1, "amount_cents": 250, "currency": "EUR", "status": "paid",
           "shipping": {"address": "a", "carrier": "c", "tracking_number": None}}
    state = {**row, "id": 1, "created_at": 5, "status": "PAID",
             "shipping": {"address": "a", "carrier": "c", "tracking_number": None}}
    assert order_matches(state, row)  # v2's status enum is upper case
    assert not order_matches({**state, "amount_cents": 249}, row)
    assert not order_matches(state, None) and not order_matches(None, row) and order_matches(None, None)


def test_orders_per_minute_counts_each_key_once_at_its_first_creation() -> None:
    later = NOW + timedelta(minutes=3)
    events = [event("1", 1, offset=1), event("1", 2, offset=2, deleted=True),
              event("1", 3, offset=3, created=later),  # re-created: not counted again
              event("2", 1, offset=4, created=later), event("2", 1, offset=5, created=later),  # a duplicate
              event("3", 1, offset=6, created=NOW - timedelta(hours=2))]  # older than the view keeps
    counts = orders_per_minute(events, now=NOW.timestamp())
    assert counts == {ORDERS_PER_MINUTE.start(micros(NOW)): 1, ORDERS_PER_MINUTE.start(micros(later)): 1}


def test_invoices_that_match_the_orders_have_no_problem() -> None:
    orders = {"1": {"status": "paid", "amount_cents": 250, "currency": "EUR"},
              "2": {"status": "shipped", "amount_cents": 99, "currency": "USD"},
              "3": {"status": "pending", "amount_cents": 10, "currency": "EUR"}}
    check = check_invoices(orders, [("1", 250, "EUR"), ("2", 99, "USD")])
    assert check.ok and (check.missing, check.doubled, check.wrong, check.unexpected) == (0, 0, 0, 0)


@pytest.mark.parametrize("invoices, counts, problem", [
    ([], (1, 0, 0, 0), "paid order 1 has no invoice"),
    ([("1", 250, "EUR"), ("1", 250, "EUR")], (0, 1, 0, 0), "paid order 1 has 2 invoices"),
    ([("1", 250, "USD")], (0, 0, 1, 0), "paid order 1: invoice 250 USD != order 250 EUR"),
    ([("1", 249, "EUR")], (0, 0, 1, 0), "paid order 1: invoice 249 EUR != order 250 EUR"),
    ([("1", 250, "EUR"), ("2", 10, "EUR")], (0, 0, 0, 1), "cancelled order 2 has an invoice"),
    ([("1", 250, "EUR"), ("9", 10, "EUR")], (0, 0, 0, 1), "deleted order 9 has an invoice"),
    ([("1", 250, "EUR"), ("2", 10, "EUR"), ("2", 10, "EUR")], (0, 1, 0, 0), "cancelled order 2 has 2 invoices"),
])
def test_a_missing_doubled_wrong_or_unexpected_invoice_is_reported_on_its_row(
        invoices: list[tuple[str, int, str]], counts: tuple[int, int, int, int], problem: str) -> None:
    orders = {"1": {"status": "paid", "amount_cents": 250, "currency": "EUR"},
              "2": {"status": "cancelled", "amount_cents": 10, "currency": "EUR"}}
    check = check_invoices(orders, invoices)
    assert (check.missing, check.doubled, check.wrong, check.unexpected) == counts
    assert check.problems == [problem]


def test_invoices_are_checked_only_for_the_keys_asked_for() -> None:
    orders = {1: {"status": "paid", "amount_cents": 5, "currency": "EUR"}}
    check = check_invoices(orders, [(2, 5, "EUR")], keys=[1, 3])  # order 2 is someone else's
    assert check.problems == ["paid order 1 has no invoice"]


def test_the_billing_services_invoices_are_not_counted_as_the_loads_writes() -> None:
    db = Snapshot({"orders": {"1": 3}, "customers": {"7": 2}, "invoices": {"1": 5}}, {}, {})
    assert db.committed_writes == 5


# -- the views, over HTTP, as the checker reads them from a worker ------------------------------

def parts(value: Any) -> dict[str, Any]:
    """A stage-2 view entry holding `value` in one part (what `/table/<name>/<key>/` answers)."""
    return {"parts": {"0": {"epoch": 1, "version": 1, "value": value}}}


class Tables(dict[tuple[str, str], Any]):
    """(table, key) -> what the view holds; `asked` counts the lookups per table."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: Counter[str] = Counter()


@pytest.fixture
async def views() -> AsyncIterator[tuple[str, Tables]]:
    """A web server answering `/table/<name>/<key>/` from a dict the test fills: the views under test."""
    tables = Tables()

    async def lookup(request: web.Request) -> web.Response:
        tables.asked[request.match_info["name"]] += 1
        found = tables.get((request.match_info["name"], request.match_info["key"]))
        if found is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(text=json.dumps(found), content_type="application/json")

    app = web.Application()
    app.router.add_get("/table/{name}/{key}/", lookup)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", tables
    finally:
        await runner.cleanup()


def agreeing(tables: dict[tuple[str, str], Any], db: Snapshot, minute: int) -> None:
    """Fill `tables` with views that agree with `db` (two orders of customer 1, both pending)."""
    for key, row in db.orders.items():
        tables[("orders", key)] = {"seq": db.sequences["orders"][key], "state": {**row, "status": "PENDING"}}
    tables[("customer_orders", "1")] = parts({"count": 2, "total_cents": {"EUR": 300},
                                               "last_order_at": max(db.created.values())})
    tables[("orders_by_status", "pending")] = parts(2)
    tables[("orders_per_minute", str(minute))] = parts(2)


def two_orders() -> Snapshot:
    row = {"customer_id": 1, "amount_cents": 150, "currency": "EUR", "status": "pending", "shipping": None}
    return Snapshot({"orders": {"1": 1, "2": 1}}, {"1": dict(row), "2": dict(row)}, {},
                    {"1": micros(NOW), "2": micros(NOW) + 5})


async def test_views_that_agree_have_no_mismatch(views: tuple[str, Tables]) -> None:
    base, tables = views
    db, minute = two_orders(), ORDERS_PER_MINUTE.start(micros(NOW))
    agreeing(tables, db, minute)
    assert await view_mismatches(base, db, {minute: 2}) == (0, [])


@pytest.mark.parametrize("table, key, wrong, example", [
    ("orders_by_status", "pending", parts(1), "orders_by_status[pending] = 1 != 2"),
    ("orders_per_minute", "MINUTE", parts(3), "orders_per_minute[MINUTE] = 3 != 2"),
    ("customer_orders", "1", parts({"count": 2, "total_cents": {"EUR": 300}, "last_order_at": 1}),
     "customer_orders[1]"),
    ("customer_orders", "1", parts({"count": 2, "total_cents": {"EUR": 299}, "last_order_at": None}),
     "customer_orders[1]"),
    ("orders", "2", None, "orders[2] = None"),
    ("orders", "1", {"seq": 0, "state": {"customer_id": 1, "amount_cents": 150, "currency": "EUR",
                                         "status": "PENDING", "shipping": None}}, "orders[1] at sequence 0 != 1"),
])
async def test_a_view_off_by_one_is_reported_on_its_row(views: tuple[str, Tables], table: str,
                                                        key: str, wrong: Any, example: str) -> None:
    base, tables = views
    db, minute = two_orders(), ORDERS_PER_MINUTE.start(micros(NOW))
    agreeing(tables, db, minute)
    key, example = key.replace("MINUTE", str(minute)), example.replace("MINUTE", str(minute))
    if wrong is None:
        del tables[(table, key)]
    else:
        tables[(table, key)] = wrong
    count, examples = await view_mismatches(base, db, {minute: 2})
    assert count == 1 and examples[0].startswith(example), examples


async def test_a_stale_cache_entry_is_a_mismatch_and_a_missing_one_is_not(redis_url: str) -> None:
    keys = [f"chk-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    row = {"customer_id": 1, "amount_cents": 150, "currency": "EUR", "status": "pending", "shipping": None}
    db = Snapshot({"orders": {k: 2 for k in keys}}, {k: dict(row) for k in keys}, {})
    redis = Redis.from_url(redis_url)
    try:
        await redis.set(f"entity:orders:{keys[0]}", encode_entry(2, {**row, "status": "PENDING"}))  # fresh
        await redis.set(f"entity:orders:{keys[1]}", encode_entry(1, {**row, "amount_cents": 1}))  # stale
        checker = Checker("unused", "unused", redis_url)  # keys[2]: no entry, a miss
        assert await checker.cache_mismatches(db) == 1
        await redis.set(f"entity:orders:{keys[1]}", encode_entry(2, {**row, "amount_cents": 1}))  # wrong state
        assert await checker.cache_mismatches(db) == 1
        await redis.set(f"entity:orders:{keys[1]}", encode_entry(2, dict(row)))
        assert await checker.cache_mismatches(db) == 0
    finally:
        await redis.delete(*(f"entity:orders:{k}" for k in keys))
        await redis.aclose()


async def test_stopping_early_leaves_out_the_per_order_lookups_while_an_aggregate_is_wrong(
        views: tuple[str, Tables]) -> None:
    base, tables = views
    db, minute = two_orders(), ORDERS_PER_MINUTE.start(micros(NOW))
    agreeing(tables, db, minute)
    tables[("orders_by_status", "pending")] = parts(1)
    count, examples = await view_mismatches(base, db, {minute: 2}, stop_early=True)
    assert count == 1 and examples == ["orders_by_status[pending] = 1 != 2"]
    assert tables.asked["orders"] == 0 and tables.asked["customer_orders"] == 1
    tables[("orders_by_status", "pending")] = parts(2)
    assert await view_mismatches(base, db, {minute: 2}, stop_early=True) == (0, [])
    assert tables.asked["orders"] == 2


def test_a_report_is_consistent_only_when_every_count_is_zero_and_commits_add_up() -> None:
    good = Report("f", writes=10, ambiguous=1, committed=11)
    assert good.consistent
    for broken in ({"views_checked": False}, {"lost": 1}, {"reordered": 1}, {"phantom": 1}, {"view_mismatches": 1},
                   {"cache_mismatches": 1}, {"v1_mismatches": 1}, {"invoices_missing": 1},
                   {"invoices_doubled": 1}, {"invoice_mismatches": 1}, {"committed": 9}, {"committed": 12}):
        fields: dict[str, Any] = {"writes": 10, "ambiguous": 1, "committed": 11, **broken}
        assert not Report("f", **fields).consistent, broken


class ScriptedChecker(Checker):
    """A checker whose checks find the views wrong until `right_after` checks have run."""

    def __init__(self, right_after: int) -> None:
        super().__init__("unused", "unused", "unused")
        self.right_after = right_after
        self.stopped_early: list[bool] = []

    async def check(self, report: Report, view_url: str, *, stop_early: bool = False) -> Report:
        self.stopped_early.append(stop_early)
        report.views_checked = True
        report.view_mismatches = 0 if len(self.stopped_early) > self.right_after else 3
        return report


async def test_converging_checks_stop_early_and_the_check_at_the_deadline_asks_everything() -> None:
    checker = ScriptedChecker(right_after=10**6)
    report = await checker.converge(Report("f"), "unused", timeout=0.0)
    assert checker.stopped_early == [True, False]
    assert report.converge_s is None and report.view_mismatches == 3 and not report.ok


async def test_a_check_that_finds_everything_right_records_the_time_to_converge() -> None:
    checker = ScriptedChecker(right_after=1)
    report = await checker.converge(Report("f"), "unused", timeout=60.0)
    assert checker.stopped_early == [True, True]
    assert report.converge_s is not None and report.ok

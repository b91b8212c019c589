"""The database's truth, and whether views, events and the billing service's invoices agree with it."""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import asyncpg

from app.views import micros, present_count, present_state
from chaos.topiclog import Seen
from models.order import CUSTOMER_ORDERS, ORDERS_PER_MINUTE
from services.billing import INVOICED

STATUSES = ("pending", "paid", "shipped", "cancelled")
#: The entities the load generator writes: their sequences count its committed writes (the
#: billing service's `invoices` are written by it, not by the load).
LOADED_ENTITIES = ("orders", "customers")
K = TypeVar("K", bound=Hashable)


@dataclass
class Snapshot:
    """The database's truth: committed sequences and current rows."""

    sequences: dict[str, dict[str, int]]  # entity -> key -> committed writes
    orders: dict[str, dict[str, Any]]     # order id -> expected state
    customers: dict[str, str]             # customer id -> name
    created: dict[str, int] = field(default_factory=dict)  # live order id -> created_at (epoch µs)
    invoices: list[tuple[str, int, str]] = field(default_factory=list)  # (order id, amount_cents, currency)

    @property
    def committed_writes(self) -> int:
        """The load generator's committed writes (one sequence each)."""
        return sum(sum(self.sequences.get(entity, {}).values()) for entity in LOADED_ENTITIES)


async def snapshot(dsn: str) -> Snapshot:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction(isolation="repeatable_read"):
            sequences: dict[str, dict[str, int]] = defaultdict(dict)
            for row in await conn.fetch("SELECT entity, key, seq FROM event_sequences"):
                sequences[row["entity"]][row["key"]] = row["seq"]
            rows = await conn.fetch(
                "SELECT o.id, o.customer_id, o.amount_cents, o.currency, o.status, s.address, s.carrier, "
                "s.tracking_number, o.created_at FROM orders o LEFT JOIN order_shipping s ON s.order_id = o.id")
            orders = {str(r["id"]): {
                "customer_id": r["customer_id"], "amount_cents": r["amount_cents"], "currency": r["currency"],
                "status": r["status"],
                "shipping": None if r["address"] is None else {
                    "address": r["address"], "carrier": r["carrier"], "tracking_number": r["tracking_number"]},
            } for r in rows}
            created = {str(r["id"]): micros(r["created_at"]) for r in rows}
            customers = {str(r["id"]): r["name"] for r in await conn.fetch("SELECT id, name FROM customers")}
            # In the same snapshot as the orders: an invoice is compared with the order it was made from.
            invoices = [(str(r["order_id"]), r["amount_cents"], r["currency"])
                        for r in await conn.fetch("SELECT order_id, amount_cents, currency FROM invoices")]
    finally:
        await conn.close()
    return Snapshot(dict(sequences), orders, customers, created, invoices)


def orders_per_minute(events: Iterable[Seen], now: float | None = None) -> dict[int, int]:
    """What `orders_per_minute` must hold, from the `orders-v2` events: each key counted once,
    in the minute of its first creation (a delete does not undo it, a re-create does not
    count again); windows older than the view keeps are left out."""
    first: dict[str, Seen] = {}
    for seen in events:
        if seen.data is not None and (seen.key not in first or seen.sequence < first[seen.key].sequence):
            first[seen.key] = seen
    horizon = (time.time() if now is None else now) - ORDERS_PER_MINUTE.keep + 60  # a minute of slack at the edge
    counts: dict[int, int] = defaultdict(int)
    for seen in first.values():
        minute = ORDERS_PER_MINUTE.start(micros(seen.data["created_at"]))  # type: ignore[index]
        if minute >= horizon:
            counts[minute] += 1
    return dict(counts)


def order_matches(state: dict[str, Any] | None, want: dict[str, Any] | None) -> bool:
    """An order state (view, cache or event data) equals the database row (None: deleted)."""
    if state is None or want is None:
        return state is None and want is None
    shipping = state.get("shipping")
    got = {"customer_id": state.get("customer_id"), "amount_cents": state.get("amount_cents"),
           "currency": state.get("currency"), "status": str(state.get("status", "")).lower(),
           "shipping": None if not shipping else {
               k: shipping.get(k) for k in ("address", "carrier", "tracking_number")}}
    return got == want


def v1_matches(last: Seen | None, row: dict[str, Any] | None) -> bool:
    """The newest orders-v1 event of a key says what the database says (data None: deleted)."""
    if last is None:
        return False
    if row is None or last.data is None:
        return row is None and last.data is None
    return (last.data["amount"] == row["amount_cents"] / 100 and last.data["status"] == row["status"]
            and last.data["customer_id"] == row["customer_id"])


@dataclass
class InvoiceCheck:
    """The billing service's promise: one invoice per paid or shipped order, with its amount and
    currency, and none for any other order. Each broken order counts once, on one row."""

    missing: int = 0     # a paid or shipped order without an invoice
    doubled: int = 0     # an order with more than one invoice (an event applied twice)
    wrong: int = 0       # a paid or shipped order's one invoice, with another amount or currency
    unexpected: int = 0  # an invoice of an order neither paid nor shipped, or deleted
    problems: list[str] = field(default_factory=list)  # every broken order

    @property
    def ok(self) -> bool:
        return not self.problems


def check_invoices(orders: Mapping[K, Mapping[str, Any]], invoices: Iterable[tuple[K, int, str]],
                   keys: Iterable[K] | None = None) -> InvoiceCheck:
    """Compare `invoices` ((order id, amount_cents, currency) rows) with `orders` (order id ->
    its row's status, amount_cents and currency; an absent order is a deleted one), for the
    order ids `keys` (default: every order and every invoiced order id)."""
    by_order: dict[K, list[tuple[K, int, str]]] = defaultdict(list)
    for invoice in invoices:
        by_order[invoice[0]].append(invoice)
    out = InvoiceCheck()
    if keys is None:
        keys = [*orders, *(key for key in by_order if key not in orders)]
    for key in keys:
        order, got = orders.get(key), by_order.get(key, [])
        status = "deleted" if order is None else order["status"]
        if len(got) > 1:
            out.doubled += 1
            out.problems.append(f"{status} order {key} has {len(got)} invoices")
        elif status not in INVOICED:
            if got:
                out.unexpected += 1
                out.problems.append(f"{status} order {key} has an invoice")
        elif not got:
            out.missing += 1
            out.problems.append(f"{status} order {key} has no invoice")
        elif order is not None and got[0][1:] != (order["amount_cents"], order["currency"]):
            out.wrong += 1
            out.problems.append(f"{status} order {key}: invoice {got[0][1]} {got[0][2]} "
                                f"!= order {order['amount_cents']} {order['currency']}")
    return out


async def view_mismatches(base: str, db: Snapshot, minutes: dict[int, int] | None = None, *,
                          stop_early: bool = False) -> tuple[int, list[str]]:
    """Keys of the views that differ from the database (asked over the worker's HTTP API), and examples.

    `minutes`: what `orders_per_minute` must hold (`orders_per_minute()` of the topic); None skips it.
    The aggregates (a few hundred keys) are asked first; `stop_early` leaves out the `orders`
    lookups (one per order, thousands) while an aggregate is still wrong: a check on a worker
    that is catching up otherwise loads it with thousands of requests that cannot all agree yet
    (one such check took 18-31 s beside two other chaos stacks, and slowed what it waited for).
    """
    examples: list[str] = []

    def differs(what: str) -> int:
        if len(examples) < 5:
            examples.append(what)
        return 1

    wrong = 0
    semaphore = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def lookup(table: str, key: str) -> Any:
            async with semaphore:
                try:
                    async with session.get(f"{base}/table/{table}/{key}/") as response:
                        if response.status == 404:
                            return None
                        if response.status != 200:
                            return MISSING
                        return await response.json()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    return MISSING

        want_customers: dict[str, dict[str, Any]] = {}
        for oid, row in db.orders.items():
            c = want_customers.setdefault(str(row["customer_id"]),
                                          {"count": 0, "total_cents": {}, "last_order_at": None})
            c["count"] += 1
            c["total_cents"][row["currency"]] = c["total_cents"].get(row["currency"], 0) + row["amount_cents"]
            if oid in db.created:
                c["last_order_at"] = max(c["last_order_at"] or 0, db.created[oid])
        customer_keys = sorted({str(r["customer_id"]) for r in db.orders.values()} | set(db.customers))
        stored = await asyncio.gather(*(lookup("customer_orders", k) for k in customer_keys))
        for key, entry in zip(customer_keys, stored, strict=True):
            got = None if entry in (None, MISSING) else CUSTOMER_ORDERS.present(entry)
            want = want_customers.get(key)
            fields = ("count", "total_cents", "last_order_at") if db.created else ("count", "total_cents")
            if entry is MISSING or (got is None) != (want is None) or (
                    got is not None and want is not None
                    and any(got[f] != want[f] for f in fields)):
                wrong += differs(f"customer_orders[{key}] = {got!r:.80} != {want!r:.80}")

        counts = await asyncio.gather(*(lookup("orders_by_status", s) for s in STATUSES))
        for status, entry in zip(STATUSES, counts, strict=True):
            got_count = -1 if entry is MISSING else (0 if entry is None else present_count(entry))
            want_count = sum(1 for r in db.orders.values() if r["status"] == status)
            if got_count != want_count:
                wrong += differs(f"orders_by_status[{status}] = {got_count} != {want_count}")

        if minutes is not None:
            windows = sorted(minutes)
            found = await asyncio.gather(*(lookup("orders_per_minute", str(m)) for m in windows))
            for minute, entry in zip(windows, found, strict=True):
                got_count = -1 if entry is MISSING else (0 if entry is None else present_count(entry))
                if got_count != minutes[minute]:
                    wrong += differs(f"orders_per_minute[{minute}] = {got_count} != {minutes[minute]}")
        if stop_early and wrong:
            return wrong, examples

        order_keys = list(db.sequences.get("orders", {}))
        entries = await asyncio.gather(*(lookup("orders", k) for k in order_keys))
        for key, entry in zip(order_keys, entries, strict=True):
            if entry is MISSING:
                wrong += differs(f"orders[{key}] lookup failed")
                continue
            state = None if entry is None else present_state(entry)
            if not order_matches(state, db.orders.get(key)):
                wrong += differs(f"orders[{key}] = {state!r:.80} != {db.orders.get(key)!r:.80}")
            elif entry is not None and entry["seq"] != db.sequences["orders"][key]:
                wrong += differs(f"orders[{key}] at sequence {entry['seq']} != {db.sequences['orders'][key]}")
    return wrong, examples


MISSING: Any = object()  # a lookup that failed (worker unreachable, rebalancing): not converged

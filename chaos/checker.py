"""The checker: reads the topics, the database, the views and the cache, and counts broken promises.

Promises (see the fault-injection issue):
- every committed write is exactly one logical event: per key, the distinct sequences on a
  topic are exactly 1..n, where n is the key's sequence in the database (each load
  transaction writes one aggregate, so n counts its committed writes); copies of a message
  carry its event id; no event carries a rolled-back write's marker (a negative amount);
- per-key order: first copies of a key's events come in increasing sequence order;
- after the system is quiet, the `orders` view, `customer_orders`, `orders_by_status`, the
  Redis cache and the last `orders-v1` event of each key agree with the database.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.cache import connect_redis, decode_entry
from app.events import decode, schema_for_topic
from app.views import present_count, present_customer, present_order

SOURCE_TOPICS = ("orders-v2", "customers-v1")
DERIVED_TOPICS = ("orders-v1",)
STATUSES = ("pending", "paid", "shipped", "cancelled")


@dataclass(frozen=True)
class Seen:
    """One decoded event message."""

    partition: int
    offset: int
    key: str
    event_id: str
    sequence: int
    data: dict[str, Any] | None


class TopicLog:
    """Every message of a topic from the beginning, read in the background."""

    def __init__(self, bootstrap: str, topic: str, *, decode_events: bool = True) -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        self.decode_events = decode_events
        self.events: list[Seen] = []
        self.undecodable = 0
        self.messages = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> TopicLog:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="earliest", fetch_max_wait_ms=10)
        await self._consumer.start()
        partitions: set[int] | None = None
        for _ in range(100):
            await self._consumer.topics()
            partitions = self._consumer.partitions_for_topic(self.topic)
            if partitions:
                break
            await asyncio.sleep(0.1)
        if not partitions:
            raise RuntimeError(f"topic {self.topic} has no partitions")
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._consumer is not None
        schema = schema_for_topic(self.topic) if self.decode_events else None
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            for tp, messages in batch.items():
                for m in messages:
                    self.messages += 1
                    if schema is None:
                        continue
                    try:
                        record = decode(schema, m.value or b"")
                    except Exception:  # poison: counted, never a logical event
                        self.undecodable += 1
                        continue
                    self.events.append(Seen(tp.partition, m.offset, (m.key or b"").decode(errors="replace"),
                                            str(record["event_id"]), record["sequence"], record["data"]))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._consumer is not None:
            await self._consumer.stop()


async def count_messages(bootstrap: str, topic: str, *, at_least: int, timeout: float = 30.0) -> int:
    """Messages on `topic`, once there are `at_least` (or `timeout` has passed)."""
    log = TopicLog(bootstrap, topic, decode_events=False)
    await log.start()
    try:
        deadline = time.monotonic() + timeout
        while log.messages < at_least and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return log.messages
    finally:
        await log.stop()


@dataclass
class TopicCheck:
    """The promises on one topic."""

    topic: str
    events: int = 0          # distinct logical events (distinct event ids)
    duplicates: int = 0      # further copies of an event id
    lost: int = 0            # committed sequences with no event
    reordered: int = 0       # first copies arriving after a higher sequence of the key
    phantom: int = 0         # events beyond the committed sequence, or of rolled-back writes
    split: int = 0           # one sequence of a key under two event ids (two logical events)
    last: dict[str, Seen] = field(default_factory=dict)  # key -> its highest-sequence event
    examples: list[str] = field(default_factory=list)    # a few of what is broken, for the report

    @property
    def ok(self) -> bool:
        return not (self.lost or self.reordered or self.phantom or self.split)


def check_topic(topic: str, events: list[Seen], committed: dict[str, int]) -> TopicCheck:
    """Count lost, duplicated, reordered and phantom events of `topic` against `committed` (key -> n)."""
    out = TopicCheck(topic)
    by_key: dict[str, list[Seen]] = defaultdict(list)
    for seen in sorted(events, key=lambda s: (s.partition, s.offset)):
        by_key[seen.key].append(seen)
    for key, seen_list in by_key.items():
        ids: dict[str, int] = {}
        sequences: dict[int, str] = {}
        highest = 0
        for seen in seen_list:
            if seen.event_id in ids:
                out.duplicates += 1
                continue
            ids[seen.event_id] = seen.sequence
            if seen.sequence in sequences:
                out.split += 1
                continue
            sequences[seen.sequence] = seen.event_id
            if seen.sequence < highest:
                out.reordered += 1
            else:
                highest = seen.sequence
                out.last[key] = seen
            data = seen.data or {}
            if data.get("amount_cents", 0) < 0 or data.get("amount", 0) < 0:
                out.phantom += 1  # the marker of a rolled-back write
        n = committed.get(key, 0)
        out.phantom += sum(1 for s in sequences if s > n)
        missing = [s for s in range(1, n + 1) if s not in sequences]
        out.lost += len(missing)
        if missing and len(out.examples) < 5:
            out.examples.append(f"{topic} key {key} lost sequences {missing[:5]} "
                                f"(partition {seen_list[0].partition})")
        out.events += len(ids)
    # Keys with committed writes and not a single event.
    out.lost += sum(n for key, n in committed.items() if key not in by_key)
    return out


@dataclass
class Snapshot:
    """The database's truth: committed sequences and current rows."""

    sequences: dict[str, dict[str, int]]  # entity -> key -> committed writes
    orders: dict[str, dict[str, Any]]     # order id -> expected state
    customers: dict[str, str]             # customer id -> name

    @property
    def committed_writes(self) -> int:
        return sum(sum(keys.values()) for keys in self.sequences.values())


async def snapshot(dsn: str) -> Snapshot:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction(isolation="repeatable_read"):
            sequences: dict[str, dict[str, int]] = defaultdict(dict)
            for row in await conn.fetch("SELECT entity, key, seq FROM event_sequences"):
                sequences[row["entity"]][row["key"]] = row["seq"]
            orders = {str(r["id"]): {
                "customer_id": r["customer_id"], "amount_cents": r["amount_cents"], "currency": r["currency"],
                "status": r["status"],
                "shipping": None if r["address"] is None else {
                    "address": r["address"], "carrier": r["carrier"], "tracking_number": r["tracking_number"]},
            } for r in await conn.fetch(
                "SELECT o.id, o.customer_id, o.amount_cents, o.currency, o.status, s.address, s.carrier, "
                "s.tracking_number FROM orders o LEFT JOIN order_shipping s ON s.order_id = o.id")}
            customers = {str(r["id"]): r["name"] for r in await conn.fetch("SELECT id, name FROM customers")}
    finally:
        await conn.close()
    return Snapshot(dict(sequences), orders, customers)


def order_matches(state: dict[str, Any] | None, want: dict[str, Any] | None) -> bool:
    """An order state (view, cache or event data) equals the database row (None: deleted)."""
    if state is None or want is None:
        return state is None and want is None
    shipping = state.get("shipping")
    got = {"customer_id": state.get("customer_id"), "amount_cents": state.get("amount_cents"),
           "currency": state.get("currency"), "status": str(state.get("status", "")).lower(),
           "shipping": None if not shipping else {k: shipping.get(k) for k in ("address", "carrier", "tracking_number")}}
    return got == want


@dataclass
class Report:
    """One row of the reliability table."""

    fault: str
    writes: int = 0            # acknowledged commits of the load generator
    ambiguous: int = 0         # commits whose outcome the client could not know
    retried: int = 0
    rolled_back: int = 0
    committed: int = 0         # committed writes according to the database
    events: int = 0
    duplicates: int = 0
    lost: int = 0
    reordered: int = 0
    phantom: int = 0
    view_mismatches: int = 0
    cache_mismatches: int = 0
    v1_mismatches: int = 0
    converge_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # what was still broken at the last check

    @property
    def consistent(self) -> bool:
        """Nothing lost, reordered or invented, every derived store equal to the database."""
        return (self.lost == 0 and self.reordered == 0 and self.phantom == 0 and self.view_mismatches == 0
                and self.cache_mismatches == 0 and self.v1_mismatches == 0
                and self.writes <= self.committed <= self.writes + self.ambiguous)

    @property
    def ok(self) -> bool:
        return self.consistent and self.converge_s is not None

    HEADER = ("| fault | writes | events | duplicates seen | lost | reordered | view/cache/v1 mismatches "
              "| time to converge | notes |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")

    def row(self) -> str:
        converge = "never" if self.converge_s is None else f"{self.converge_s:.1f} s"
        notes = ", ".join(f"{k} {v}" for k, v in self.notes.items() if not k.startswith("_"))
        if self.ambiguous or self.retried:
            notes = ", ".join(filter(None, [f"{self.retried} retried, {self.ambiguous} ambiguous", notes]))
        return (f"| {self.fault} | {self.writes} | {self.events} | {self.duplicates} | {self.lost} | {self.reordered} "
                f"| {self.view_mismatches}/{self.cache_mismatches}/{self.v1_mismatches} | {converge} | {notes} |")


class Checker:
    """Reads the topics from the start of a run, and checks everything against the database."""

    def __init__(self, dsn: str, bootstrap: str, redis_url: str) -> None:
        self.dsn = dsn
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.logs: dict[str, TopicLog] = {}

    async def start(self) -> Checker:
        for topic in (*SOURCE_TOPICS, *DERIVED_TOPICS):
            self.logs[topic] = await TopicLog(self.bootstrap, topic).start()
        return self

    async def stop(self) -> None:
        for log in self.logs.values():
            await log.stop()

    async def check(self, report: Report, view_url: str) -> Report:
        """Fill `report` with what is broken right now (topics first: the rest can only agree after)."""
        db = await snapshot(self.dsn)
        report.committed = db.committed_writes
        checks = {topic: check_topic(topic, log.events, db.sequences.get(schema_for_topic(topic).entity, {}))
                  for topic, log in self.logs.items()}
        report.events = sum(checks[t].events for t in SOURCE_TOPICS)
        report.duplicates = sum(c.duplicates for c in checks.values())
        report.lost = sum(c.lost for c in checks.values())
        report.reordered = sum(c.reordered for c in checks.values())
        report.phantom = sum(c.phantom + c.split for c in checks.values())
        report.v1_mismatches = sum(
            1 for key in db.sequences.get("orders", {}) if not v1_matches(checks["orders-v1"].last.get(key),
                                                                           db.orders.get(key)))
        report.examples = [e for c in checks.values() for e in c.examples][:5]
        report.cache_mismatches = await self.cache_mismatches(db)
        report.view_mismatches, examples = await view_mismatches(view_url, db)
        report.examples += examples[:5]
        return report

    async def cache_mismatches(self, db: Snapshot) -> int:
        """Cached entries that differ from the database (an absent entry is a miss, not a mismatch)."""
        redis = connect_redis(self.redis_url, timeout=5)
        wrong = 0
        try:
            for entity in ("orders", "customers"):
                keys = list(db.sequences.get(entity, {}))
                for start in range(0, len(keys), 1000):
                    chunk = keys[start:start + 1000]
                    for key, raw in zip(chunk, await redis.mget([f"entity:{entity}:{k}" for k in chunk]), strict=True):
                        entry = None if raw is None else decode_entry(raw)
                        if raw is None:
                            continue
                        if entry is None or entry[0] != db.sequences[entity][key]:
                            wrong += 1
                        elif entity == "orders" and not order_matches(entry[1], db.orders.get(key)):
                            wrong += 1
                        elif entity == "customers" and (entry[1] or {}).get("name") != db.customers.get(key):
                            wrong += 1
        finally:
            await redis.aclose()
        return wrong

    async def read_through_mismatches(self, database_url: str) -> int:
        """Orders a reader gets through `CacheRepository` (filling what a flush emptied) that differ
        from the database."""
        from app.cache import CacheRepository
        from app.orm import Database
        from models import Order

        db = await snapshot(self.dsn)
        repo = CacheRepository(connect_redis(self.redis_url, timeout=5),
                               Database(database_url, service="orders", record_reads=False))
        try:
            keys = list(db.sequences.get("orders", {}))
            got = await repo.get_many(Order, keys)
        finally:
            await repo.redis.aclose()
            await repo.db.close()
        return sum(1 for key in keys if not order_matches(got[key], db.orders.get(key)))

    async def converge(self, report: Report, view_url: str, *, timeout: float) -> Report:
        """Check until nothing is broken (recording the time that took) or `timeout` passes."""
        started = time.monotonic()
        while True:
            await self.check(report, view_url)
            elapsed = time.monotonic() - started
            if report.consistent:
                report.converge_s = elapsed
                return report
            if elapsed > timeout:
                report.converge_s = None
                return report
            await asyncio.sleep(0.5)


def v1_matches(last: Seen | None, row: dict[str, Any] | None) -> bool:
    """The newest orders-v1 event of a key says what the database says (data None: deleted)."""
    if last is None:
        return False
    if row is None or last.data is None:
        return row is None and last.data is None
    return (last.data["amount"] == row["amount_cents"] / 100 and last.data["status"] == row["status"]
            and last.data["customer_id"] == row["customer_id"])


async def view_mismatches(base: str, db: Snapshot) -> tuple[int, list[str]]:
    """Keys of the views that differ from the database (asked over the worker's HTTP API), and examples."""
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

        order_keys = list(db.sequences.get("orders", {}))
        entries = await asyncio.gather(*(lookup("orders", k) for k in order_keys))
        for key, entry in zip(order_keys, entries, strict=True):
            if entry is MISSING:
                wrong += differs(f"orders[{key}] lookup failed")
                continue
            state = None if entry is None else present_order(entry)
            if not order_matches(state, db.orders.get(key)):
                wrong += differs(f"orders[{key}] = {state!r:.80} != {db.orders.get(key)!r:.80}")
            elif entry is not None and entry["seq"] != db.sequences["orders"][key]:
                wrong += differs(f"orders[{key}] at sequence {entry['seq']} != {db.sequences['orders'][key]}")

        want_customers: dict[str, dict[str, Any]] = {}
        for row in db.orders.values():
            c = want_customers.setdefault(str(row["customer_id"]), {"count": 0, "total_cents": {}})
            c["count"] += 1
            c["total_cents"][row["currency"]] = c["total_cents"].get(row["currency"], 0) + row["amount_cents"]
        customer_keys = sorted({str(r["customer_id"]) for r in db.orders.values()} | set(db.customers))
        stored = await asyncio.gather(*(lookup("customer_orders", k) for k in customer_keys))
        for key, entry in zip(customer_keys, stored, strict=True):
            got = None if entry in (None, MISSING) else present_customer(entry)
            want = want_customers.get(key)
            if entry is MISSING or (got is None) != (want is None) or (
                    got is not None and want is not None
                    and (got["count"], got["total_cents"]) != (want["count"], want["total_cents"])):
                wrong += differs(f"customer_orders[{key}] = {got!r:.80} != {want!r:.80}")

        counts = await asyncio.gather(*(lookup("orders_by_status", s) for s in STATUSES))
        for status, entry in zip(STATUSES, counts, strict=True):
            got_count = -1 if entry is MISSING else (0 if entry is None else present_count(entry))
            want_count = sum(1 for r in db.orders.values() if r["status"] == status)
            if got_count != want_count:
                wrong += differs(f"orders_by_status[{status}] = {got_count} != {want_count}")
    return wrong, examples


MISSING: Any = object()  # a lookup that failed (worker unreachable, rebalancing): not converged

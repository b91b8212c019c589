"""The checker: reads the topics, the database, the views and the cache, and counts broken promises.

Promises (see the fault-injection issue):
- every committed write is exactly one logical event: per key, the distinct sequences on a
  topic are exactly 1..n, where n is the key's sequence in the database (each load
  transaction writes one aggregate, so n counts its committed writes); copies of a message
  carry its event id; no event carries a rolled-back write's marker (a negative amount);
- per-key order: first copies of a key's events come in increasing sequence order;
- down-conversion: per partition, the first copies on `orders-v1` are the valid `orders-v2`
  events, one each, in their offset order (`chaos.copies`);
- after the system is quiet, the `orders` view, `customer_orders` (count, totals, last order
  time), `orders_by_status`, `orders_per_minute` (each key once, in the minute of its first
  creation as its first event on `orders-v2` says), the Redis cache and the last `orders-v1`
  event of each key agree with the database;
- the billing service's inbox applies each orders event once: every paid or shipped order has
  exactly one invoice, with its amount and currency, and no other order has one; and its own
  writes are events too (`invoices-v1` is checked like the topics above);
- no worker commits an offset past a message it did not finish (its
  `mse_consumer_commits_past_unacked_total`, read by the run at the end of each fault).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from app.cache import connect_redis, decode_entry
from app.wire.messages import downconvert_record, schema_for_topic
from chaos.agreement import (
    Snapshot,
    check_invoices,
    order_matches,
    orders_per_minute,
    snapshot,
    v1_matches,
    view_mismatches,
)
from chaos.copies import check_copies
from chaos.promises import check_topic
from chaos.topiclog import TopicLog, Validate, count_messages

__all__ = ["Checker", "Report", "count_messages"]

SOURCE_TOPICS = ("orders-v2", "customers-v1")
DERIVED_TOPICS = ("orders-v1", "invoices-v1")
#: Down-converted topic -> its source, whose valid events it copies one to one.
COPIES = {"orders-v1": "orders-v2"}


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
    v1_mismatches: int = 0         # keys whose last orders-v1 event differs, v2 events not copied 1:1
    invoices_missing: int = 0      # paid or shipped orders without an invoice
    invoices_doubled: int = 0      # orders with more than one invoice
    invoice_mismatches: int = 0    # invoices with another amount or currency, or of an unpaid or deleted order
    commits_past_unacked: int = 0  # offset commits past an unfinished message (the workers' own count)
    converge_s: float | None = None
    views_checked: bool = True     # False: the last check left the views out (see `Checker.check`)
    notes: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # what was still broken at the last check

    @property
    def consistent(self) -> bool:
        """Nothing lost, reordered or invented, every derived store equal to the database."""
        return self.consistent_besides_views and self.views_checked and self.view_mismatches == 0

    @property
    def consistent_besides_views(self) -> bool:
        """What `consistent` asks of the topics, the cache and the invoices."""
        return (self.lost == 0 and self.reordered == 0 and self.phantom == 0
                and self.cache_mismatches == 0 and self.v1_mismatches == 0 and self.invoices_missing == 0
                and self.invoices_doubled == 0 and self.invoice_mismatches == 0
                and self.writes <= self.committed <= self.writes + self.ambiguous)

    @property
    def ok(self) -> bool:
        return self.consistent and self.converge_s is not None and self.commits_past_unacked == 0

    HEADER = ("| fault | writes | events | duplicates seen | lost | reordered | view/cache/v1 mismatches "
              "| invoices missing/doubled/mismatched | time to converge | notes |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")

    def row(self) -> str:
        converge = "never" if self.converge_s is None else f"{self.converge_s:.1f} s"
        notes = ", ".join(f"{k} {v}" for k, v in self.notes.items() if not k.startswith("_"))
        if self.ambiguous or self.retried:
            notes = ", ".join(filter(None, [f"{self.retried} retried, {self.ambiguous} ambiguous", notes]))
        if self.commits_past_unacked:
            notes = ", ".join(filter(None, [f"{self.commits_past_unacked} commits past unacked", notes]))
        return (f"| {self.fault} | {self.writes} | {self.events} | {self.duplicates} | {self.lost} | {self.reordered} "
                f"| {self.view_mismatches}/{self.cache_mismatches}/{self.v1_mismatches} "
                f"| {self.invoices_missing}/{self.invoices_doubled}/{self.invoice_mismatches} | {converge} | {notes} |")


class Checker:
    """Reads the topics from the start of a run, and checks everything against the database."""

    def __init__(self, dsn: str, bootstrap: str, redis_url: str) -> None:
        self.dsn = dsn
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.logs: dict[str, TopicLog] = {}

    async def start(self) -> Checker:
        sources = {source: target for target, source in COPIES.items()}
        for topic in (*SOURCE_TOPICS, *DERIVED_TOPICS):
            validate = convertible(topic, sources[topic]) if topic in sources else None
            self.logs[topic] = await TopicLog(self.bootstrap, topic, validate=validate).start()
        return self

    async def stop(self) -> None:
        for log in self.logs.values():
            await log.stop()

    async def check(self, report: Report, view_url: str, *, stop_early: bool = False) -> Report:
        """Fill `report` with what is broken right now (topics first: the rest can only agree after).

        `stop_early`: while the topics, invoices or cache are still wrong, the views are not
        asked, and `report.views_checked` says so; nor are the thousands of per-order lookups
        while an aggregate is still wrong (`view_mismatches`). For a check that has to know.
        """
        for log in self.logs.values():
            log.alive()
            if log.errors:
                report.notes[f"{log.topic} fetch errors (retried)"] = len(log.errors)
            if log.gaps:
                report.notes[f"{log.topic} offsets skipped by the checker's reader"] = ", ".join(log.gaps[:3])
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
        for target, source in COPIES.items():
            copies = check_copies(self.logs[source].events, self.logs[target].events, source, target)
            report.v1_mismatches += copies.broken
            report.examples += copies.examples
        invoices = check_invoices(db.orders, db.invoices)
        report.invoices_missing, report.invoices_doubled = invoices.missing, invoices.doubled
        report.invoice_mismatches = invoices.wrong + invoices.unexpected
        report.examples += invoices.problems[:5]
        report.cache_mismatches = await self.cache_mismatches(db)
        report.views_checked = not (stop_early and not report.consistent_besides_views)
        if report.views_checked:
            report.view_mismatches, examples = await view_mismatches(
                view_url, db, orders_per_minute(self.logs["orders-v2"].events), stop_early=stop_early)
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
        """Orders a reader gets through `CacheRepository` (filling what a flush emptied, connected
        to `database_url`: the worker's role, as `/entities` reads) that differ from the database."""
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
            await self.check(report, view_url, stop_early=True)
            elapsed = time.monotonic() - started
            if report.consistent:
                report.converge_s = elapsed
                return report
            if elapsed > timeout:
                # All of it, so that the report names everything still broken. The check before
                # it started in time but may have left the views out: if this one finds
                # everything right, its time, past the timeout, is what the row shows.
                await self.check(report, view_url)
                report.converge_s = time.monotonic() - started if report.consistent else None
                return report
            await asyncio.sleep(0.5)


def convertible(source: str, target: str) -> Validate:
    """Raises on a `source` record the down-converter would dead-letter instead of copying to `target`."""
    schema, version = schema_for_topic(source), schema_for_topic(target).version
    return lambda record: downconvert_record(record, schema, version)

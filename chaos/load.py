"""The load generator: several concurrent "services" writing through the evented ORM.

Each writer is a service of its own (its own `Database` and connection pool) and owns its
keys, so writes only fail because of a fault. Every transaction writes one aggregate, which
makes the per-key sequence count committed writes exactly: the checker compares it with the
events on the topics. A failed write is retried until it commits; one whose COMMIT raised
may or may not have committed, and is counted as ambiguous. One write in ten is rolled back
on purpose after its flush, with a negative amount no committed write ever has: an event
carrying it is an event of a rolled-back transaction.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy import delete, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from app.orm import Database
from app.settings import Settings
from models import Customer, Order, OrderShipping

log = logging.getLogger(__name__)

CURRENCIES = ("EUR", "USD", "GBP")
STATUSES = ("pending", "paid", "shipped", "cancelled")
# What a write can fail with while PostgreSQL restarts (the pool hands out dead connections).
TRANSIENT = (OperationalError, InterfaceError, DBAPIError, ConnectionError, OSError, asyncio.TimeoutError)


class RolledBack(Exception):
    """Raised inside a transaction to roll it back on purpose."""


@dataclass
class LoadStats:
    """What the load generator did."""

    committed: int = 0       # COMMIT acknowledged
    ambiguous: int = 0       # COMMIT raised: committed or not, the database knows
    retried: int = 0         # attempts that failed before COMMIT and were retried
    rolled_back: int = 0     # rolled back on purpose
    missing: int = 0         # found no row to change (its create's COMMIT was ambiguous and failed)
    customers: list[int] = field(default_factory=list)  # customer ids the orders refer to


@dataclass
class Load:
    """Writers for `duration` seconds (or until `stop()`), at about `rate` writes/s in all."""

    #: Where the writers connect: each service through its own role (`database_url_for`).
    settings: Settings
    order_services: int = 3
    rate: float = 100.0
    seed: int = 1
    stats: LoadStats = field(default_factory=LoadStats)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _markers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> LoadStats:
        """Write until `stop()`; returns the counts."""
        writers = self.order_services + 1
        interval = writers / self.rate
        customers = Database(self.settings.database_url_for("customers"), service="customers",
                             record_reads=False, pool_size=2)
        orders = [Database(self.settings.database_url_for("orders"), service="orders", record_reads=False,
                           pool_size=2)
                  for _ in range(self.order_services)]
        try:
            customer_ids = await self._with_retry(lambda: self._create_customers(customers, 10))
            self.stats.customers = customer_ids
            await asyncio.gather(
                self._customer_writer(customers, customer_ids, random.Random(self.seed), interval),
                *(self._order_writer(db, customer_ids, random.Random(self.seed * 100 + i), interval)
                  for i, db in enumerate(orders)))
        finally:
            for db in (customers, *orders):
                await db.close()
        return self.stats

    async def _create_customers(self, db: Database, n: int) -> list[int]:
        async with db.session() as s:
            rows = [Customer(name=f"customer {i}", email=f"c{i}@example.test") for i in range(n)]
            s.add_all(rows)
            await s.flush()
            ids = [c.id for c in rows]
        self.stats.committed += n
        return ids

    async def _paced(self, interval: float, write: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stopping.is_set():
            await write()
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            else:
                next_at = loop.time()  # behind (a fault held us up): do not burst to catch up

    async def _customer_writer(self, db: Database, ids: list[int], rng: random.Random, interval: float) -> None:
        async def rename() -> None:
            cid = rng.choice(ids)
            name = f"customer {cid} v{next(self._markers)}"  # always a change

            async def write(s: AsyncSession) -> bool:
                customer = await s.get(Customer, cid)
                if customer is None:
                    return False
                customer.name = name
                return True
            await self._transaction(db, write)
        await self._paced(interval, rename)

    async def _order_writer(self, db: Database, customers: list[int], rng: random.Random, interval: float) -> None:
        mine: list[int] = []

        async def one() -> None:
            roll = rng.random()
            if roll < 0.3 or len(mine) < 5:
                await self._create_order(db, rng, customers, mine)
            elif roll < 0.55:
                oid, status, cents = rng.choice(mine), rng.choice(STATUSES), rng.randrange(1, 100_000)
                await self._transaction(db, lambda s: self._bulk_update(s, oid, status, cents))
            elif roll < 0.75:
                oid, status = rng.choice(mine), rng.choice(STATUSES)
                await self._transaction(db, lambda s: self._attribute_update(s, oid, status))
            elif roll < 0.85:
                oid, tracking = rng.choice(mine), f"T{rng.randrange(10**6)}"
                await self._transaction(db, lambda s: self._ship(s, oid, tracking))
            elif roll < 0.9:
                oid = mine.pop(rng.randrange(len(mine)))
                await self._transaction(db, lambda s: self._delete(s, oid))
            else:
                oid, marker = rng.choice(mine), -next(self._markers)
                await self._transaction(db, lambda s: self._bulk_update(s, oid, "paid", marker), rollback=True)
        await self._paced(interval, one)

    async def _create_order(self, db: Database, rng: random.Random, customers: list[int], mine: list[int]) -> None:
        customer, cents, currency = rng.choice(customers), rng.randrange(1, 100_000), rng.choice(CURRENCIES)
        shipped = rng.random() < 0.3
        created: list[int] = []

        async def write(s: AsyncSession) -> bool:
            order = Order(customer_id=customer, amount_cents=cents, currency=currency)
            if shipped:
                order.shipping = OrderShipping(address="1 Chaos Way", carrier="DHL")
            s.add(order)
            await s.flush()
            created[:] = [order.id]
            return True
        await self._transaction(db, write)
        mine.extend(created)  # also after an ambiguous commit: later writes find out (get() is None)

    @staticmethod
    async def _bulk_update(s: AsyncSession, oid: int, status: str, cents: int) -> bool:
        result = await s.execute(update(Order).where(Order.id == oid).values(status=status, amount_cents=cents)
                                 .returning(Order.id))
        return result.first() is not None

    @staticmethod
    async def _attribute_update(s: AsyncSession, oid: int, status: str) -> bool:
        order = await s.get(Order, oid)
        if order is None:
            return False
        # A write that changes nothing raises no event; make every write a change.
        order.status = status if order.status != status else ("paid" if status != "paid" else "pending")
        return True

    @staticmethod
    async def _ship(s: AsyncSession, oid: int, tracking: str) -> bool:
        shipping = await s.get(OrderShipping, oid)
        if shipping is not None:
            shipping.tracking_number = tracking
            return True
        if await s.get(Order, oid) is None:
            return False
        s.add(OrderShipping(order_id=oid, address="2 Retry Rd", carrier="UPS", tracking_number=tracking))
        return True

    @staticmethod
    async def _delete(s: AsyncSession, oid: int) -> bool:
        result = await s.execute(delete(Order).where(Order.id == oid).returning(Order.id))
        return result.first() is not None

    async def _transaction(self, db: Database, write: Callable[[AsyncSession], Awaitable[bool]], *,
                           rollback: bool = False) -> None:
        """Run `write` in one transaction, retrying until it commits (or is rolled back on purpose).

        `write` returns False when it found nothing to change (no event is due then).
        """
        async def attempt() -> None:
            flushed = changed = False
            try:
                async with db.session() as s:
                    changed = await write(s)
                    await s.flush()
                    flushed = True
                    if rollback:
                        raise RolledBack
            except RolledBack:
                self.stats.rolled_back += 1
                return
            except TRANSIENT:
                if not flushed:
                    raise  # nothing was committed: retry
                if rollback:  # the ROLLBACK failed: the transaction died uncommitted all the same
                    self.stats.rolled_back += 1
                elif changed:  # the COMMIT itself failed: it may have been applied
                    self.stats.ambiguous += 1
                return
            if changed:
                self.stats.committed += 1
            else:
                self.stats.missing += 1
        await self._with_retry(attempt)

    async def _with_retry(self, attempt: Callable[[], Awaitable[object]], give_up_after: float = 120.0) -> object:
        backoff = 0.05
        deadline = asyncio.get_running_loop().time() + give_up_after
        while True:
            try:
                return await attempt()
            except TRANSIENT as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise  # the database never came back: a failure of the run, not a retry
                self.stats.retried += 1
                log.info("write failed (%s); retrying in %.2f s", type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

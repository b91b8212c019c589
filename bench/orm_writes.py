"""ORM writes/s, one new Order per commit: evented `Database` vs plain SQLAlchemy vs raw asyncpg.

The plain baseline maps the same columns and the same `shipping` relationship (bench.common's
PlainOrder and PlainOrderShipping), so the ORM's own work is the same on both sides and the
ratio is what the library adds: its checks before the flush and the capture trigger.

Each round runs every variant for the same wall-clock time, in rotating order, with N writer
tasks looping `insert one row; commit` until the deadline. The outbox is emptied between
rounds (no relay runs here), so it never grows.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from app.orm import Database
from bench.common import RAW_TABLE, Config, Env, Line, LoopMonitor, PlainOrder, execute, median, note, settle, spread
from models import Order

POOL = 10  # Database's default pool_size; >= the 8 writers
BULK = 1_000  # rows per commit of the bulk variant

Write = Callable[[int], Awaitable[None]]


async def _drive(write: Write, writers: int, seconds: float) -> float:
    """Run `writers` tasks calling `write` back to back for `seconds`; commits per second."""
    deadline = time.monotonic() + seconds
    counts = [0] * writers

    async def worker(w: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            await write(w * 1_000_000 + i)
            i += 1
        counts[w] = i

    t0 = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(writers)))
    return sum(counts) / (time.monotonic() - t0)


async def run(env: Env, cfg: Config) -> list[Line]:
    db = Database(env.url, service="orders", pool_size=POOL)  # defaults otherwise: events on, reads recorded
    plain_engine = create_async_engine(env.url, pool_size=POOL, max_overflow=POOL)
    plain_maker = async_sessionmaker(plain_engine)
    pool = await asyncpg.create_pool(env.dsn, min_size=POOL, max_size=POOL)

    async def evented(i: int) -> None:
        async with db.session() as s:
            s.add(Order(customer_id=i % 1000, amount_cents=1999, currency="EUR"))

    async def plain(i: int) -> None:
        async with plain_maker() as s:
            s.add(PlainOrder(customer_id=i % 1000, amount_cents=1999, currency="EUR"))
            await s.commit()

    raw_sql = (f"INSERT INTO {RAW_TABLE} (customer_id, amount_cents, currency, status, created_at, "
               f"updated_at) VALUES ($1, $2, $3, 'pending', now(), now()) RETURNING id")

    async def raw(i: int) -> None:
        # Same round trips as the ORM: BEGIN, INSERT ... RETURNING id, COMMIT.
        async with pool.acquire() as conn, conn.transaction():
            await conn.fetchval(raw_sql, i % 1000, 1999, "EUR")

    async def evented_bulk(i: int) -> None:
        async with db.session() as s:
            s.add_all([Order(customer_id=(i + n) % 1000, amount_cents=1999, currency="EUR")
                       for n in range(BULK)])

    async def plain_bulk(i: int) -> None:
        async with plain_maker() as s:
            s.add_all([PlainOrder(customer_id=(i + n) % 1000, amount_cents=1999, currency="EUR")
                       for n in range(BULK)])
            await s.commit()

    lines: list[Line] = []
    try:
        lines += await _compare(env, cfg, {"evented": evented, "plain": plain, "asyncpg": raw}, (1, 8))
        lines += await _compare(env, cfg, {"evented": evented_bulk, "plain": plain_bulk}, (1,), bulk=True)
    finally:
        await pool.close()
        await plain_engine.dispose()
        await db.close()
        await execute(env, "DELETE FROM outbox")
    return lines


async def _compare(env: Env, cfg: Config, variants: dict[str, Write], writer_counts: tuple[int, ...],
                   bulk: bool = False) -> list[Line]:
    """Rounds of every variant, rotating who goes first; a table line per writer count."""
    lines: list[Line] = []
    what = f"bulk ORM insert, {BULK:,} rows per commit" if bulk else "orm writes"
    for writers in writer_counts:
        results: dict[str, list[float]] = {k: [] for k in variants}
        for write in variants.values():  # warm-up: pools, compiled-statement caches
            await _drive(write, writers, 0.3)
        await execute(env, "DELETE FROM outbox")
        names = list(variants)
        for r in range(cfg.orm_rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            others = []
            for name in order:
                await settle()
                with LoopMonitor() as monitor:
                    results[name].append(await _drive(variants[name], writers, cfg.orm_seconds))
                others.append(monitor.other)
                if name == "evented":
                    await execute(env, "DELETE FROM outbox")
            note(f"{what}, {writers} writer(s), round {r + 1}/{cfg.orm_rounds}: "
                 + ", ".join(f"{n} {results[n][-1]:,.0f}/s" for n in names)
                 + f" (other processes up to {max(others):.2f} cores)")
        for name in names:
            note(f"{what}, {writers} writer(s), {name}: {spread(results[name])} commits/s")
        med = {n: median(v) for n, v in results.items()}
        if bulk:
            lines.append(Line(f"bulk ORM insert of {BULK:,} rows per commit, rows/s: evented vs plain "
                              "SQLAlchemy", med["evented"] * BULK, med["plain"] * BULK, "/s",
                              "ratio >= 0.7", lambda ours, ratio: ratio >= 0.7))
            continue
        label = "1 writer" if writers == 1 else f"{writers} writers"
        lines.append(Line(f"ORM writes/s, {label}: evented vs plain SQLAlchemy",
                          med["evented"], med["plain"], "/s", "ratio >= 0.85",
                          lambda ours, ratio: ratio >= 0.85))
        lines.append(Line(f"ORM writes/s, {label}: evented vs raw asyncpg (reference)",
                          med["evented"], med["asyncpg"], "/s", "reference"))
    return lines

"""Snapshot rows/s: `python -m app snapshot orders` vs one raw set-based statement over the same rows.

Each round fills `orders` (and `event_sequences`, through the capture triggers) with N orders
committed in bulk, empties the outbox, then times:
- ours: `python -m app snapshot orders` as users run it (its own process, the tables' owner),
  from start to exit; its own output says how many events it wrote;
- raw: one `INSERT INTO <scratch> SELECT key, seq, row_to_json(o) FROM orders JOIN
  event_sequences` in psql's place (asyncpg), the least work that reads every row with its
  sequence and writes it once: no Avro field selection, no extension lookup, no chunks.
The outbox is emptied after each variant. Rows/s = N / seconds.
"""
from __future__ import annotations

import asyncio
import sys
import time

import asyncpg

from bench.common import Config, Env, Line, execute, median, note, settle
from bench.workers import child_env

ROUNDS, ORDERS = 3, 50_000
QUICK_ROUNDS, QUICK_ORDERS = 1, 10_000
SCRATCH = "bench_snapshot_raw"


async def fill(env: Env, count: int) -> None:
    """`count` orders, committed in chunks through plain SQL (the capture triggers raise their
    sequences and outbox rows as for any write); then the outbox is emptied."""
    conn = await asyncpg.connect(env.dsn)
    try:
        await conn.execute("TRUNCATE orders CASCADE")
        for start in range(0, count, 10_000):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO orders (customer_id, amount_cents, currency, status, created_at, updated_at) "
                    "SELECT i % 500, i, 'EUR', 'pending', now(), now() FROM generate_series($1::int, $2::int) i",
                    start, min(start + 10_000, count) - 1)
        await conn.execute("DELETE FROM outbox")
    finally:
        await conn.close()


async def ours(env: Env) -> float:
    """Seconds `python -m app snapshot orders` takes, as its own process."""
    t0 = time.monotonic()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "snapshot", "orders", env=child_env(DATABASE_URL=env.url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await child.communicate()
    took = time.monotonic() - t0
    if child.returncode != 0:
        raise RuntimeError(f"snapshot failed: {err.decode()[-500:]}")
    note(f"snapshot: {out.decode().splitlines()[0]}")
    return took


async def raw(env: Env) -> float:
    """Seconds of the raw set-based statement."""
    conn = await asyncpg.connect(env.dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {SCRATCH}")
        await conn.execute(f"CREATE TABLE {SCRATCH} (key text, seq bigint, data json)")
        t0 = time.monotonic()
        await conn.execute(f"INSERT INTO {SCRATCH} SELECT q.key, q.seq, row_to_json(o) FROM orders o "
                           "JOIN event_sequences q ON q.entity = 'orders' AND q.key = o.id::text")
        return time.monotonic() - t0
    finally:
        await conn.close()


async def run(env: Env, cfg: Config) -> list[Line]:
    rounds, count = (QUICK_ROUNDS, QUICK_ORDERS) if cfg.quick else (ROUNDS, ORDERS)
    mine, base = [], []
    await fill(env, count)
    for i in range(rounds):
        await settle()
        mine.append(count / await ours(env))
        await execute(env, "DELETE FROM outbox")
        await settle()
        base.append(count / await raw(env))
        note(f"snapshot round {i + 1}/{rounds}: {mine[-1]:,.0f} rows/s; raw statement {base[-1]:,.0f} rows/s")
    await execute(env, f"DROP TABLE IF EXISTS {SCRATCH}")
    await execute(env, "DELETE FROM outbox")
    return [Line(f"snapshot of {count:,} orders into the outbox, rows/s: `python -m app snapshot` (own process, "
                 "start to exit) vs one raw INSERT ... SELECT of the same rows", median(mine), median(base),
                 "/s", "reference")]

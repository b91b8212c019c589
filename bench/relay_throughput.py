"""Relay throughput on a backlog, vs a raw aiokafka producer sending the same number of messages.

Ours: a backlog of N outbox rows is written with ORM bulk inserts through `Database` (one
outbox row per Order, chunks of 5,000), then a fresh `Relay` is started and timed until
`SELECT count(*) FROM outbox` (polled every 20 ms) reads 0. The time includes the relay's
start (connect, advisory lock, producer start, topic check), which is reported separately.
Relay processes, as users run them: the same backlog, then 1 and then 2 `python -m app relay`
processes started together; timed from the moment every one of them holds outbox shards (the
relays balance the shards among themselves; start-up is excluded) until the outbox is empty,
over the rows left at that moment. CPU per event of each relay process over the same span.
Baseline: an `AIOKafkaProducer` configured like the relay's (acks=all, linger_ms=0) sends N
messages of the relay's size and headers to a fresh topic, awaiting acks per 2,000 like the relay.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from sqlalchemy import insert

from app.orm import Database
from app.outbox.relay import LOCK_HOLDERS, RELAY_LOCK, Relay
from bench.common import (
    Config,
    Env,
    Line,
    LoopMonitor,
    create_topic,
    execute,
    median,
    note,
    process_cpu,
    sample_message,
    settle,
    spread,
)
from bench.workers import child_env, spawn, stop_child, tracked
from models import Order


async def write_backlog(db: Database, total: int, chunk: int) -> float:
    """Commit `total` orders through the evented ORM in bulk inserts of `chunk` (one outbox row each)."""
    t0 = time.monotonic()
    row = {"customer_id": 7, "amount_cents": 1999, "currency": "EUR"}
    for start in range(0, total, chunk):
        async with db.session() as s:
            await s.execute(insert(Order), [row] * min(chunk, total - start))
    return time.monotonic() - t0


async def _relay_round(env: Env, db: Database, cfg: Config) -> dict[str, Any]:
    await execute(env, "DELETE FROM outbox")
    took_backlog = await write_backlog(db, cfg.relay_backlog, cfg.relay_chunk)
    conn = await asyncpg.connect(env.dsn)
    try:
        pending = await conn.fetchval("SELECT count(*) FROM outbox")
        if pending != cfg.relay_backlog:
            raise RuntimeError(f"backlog has {pending} rows, expected {cfg.relay_backlog}")
        await execute(env, "VACUUM ANALYZE outbox")  # every round starts from the same table state
        await settle()
        relay = Relay(env.settings)
        active_at = float("nan")
        with LoopMonitor() as monitor:
            t0 = time.monotonic()
            task = asyncio.get_running_loop().create_task(relay.run(), name="relay")
            try:
                while True:
                    await asyncio.sleep(0.02)
                    if math.isnan(active_at) and relay.stats.active:
                        active_at = time.monotonic() - t0
                    if await conn.fetchval("SELECT count(*) FROM outbox") == 0:
                        break
                    if task.done():
                        raise RuntimeError(f"relay stopped: {relay.stats.error}")
                    if time.monotonic() - t0 > 300:
                        raise TimeoutError(f"outbox not drained: {relay.stats}")
                took = time.monotonic() - t0
            finally:
                relay.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 20)
    finally:
        await conn.close()
    return {"rate": cfg.relay_backlog / took, "seconds": took, "startup": active_at,
            "backlog_seconds": took_backlog, "batches": relay.stats.batches, "errors": relay.stats.errors,
            "monitor": monitor}


async def _process_round(env: Env, db: Database, cfg: Config, relays: int, run_dir: Path) -> dict[str, Any]:
    """`relays` relay processes on a fresh backlog: events/s once all hold shards, CPU µs per event each."""
    await execute(env, "DELETE FROM outbox")
    await write_backlog(db, cfg.relay_backlog, cfg.relay_chunk)
    await execute(env, "VACUUM ANALYZE outbox")
    await settle()
    conn = await asyncpg.connect(env.dsn)
    children = []
    try:
        env_ = child_env(DATABASE_URL=env.url, KAFKA_BROKER=env.broker.url, RELAY_WEB_PORT="0")
        children = [spawn(f"relay-{i + 1}", [sys.executable, "-m", "app", "relay"],
                          run_dir / f"relay-{relays}-{i + 1}.log", env_) for i in range(relays)]
        deadline = time.monotonic() + 60
        while await conn.fetchval(LOCK_HOLDERS, RELAY_LOCK) < relays:
            for c in children:
                if c.proc.poll() is not None:
                    raise RuntimeError(f"{c.name} exited with {c.proc.returncode}:\n{c.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{relays} relays did not all hold shards within 60 s")
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        left = await conn.fetchval("SELECT count(*) FROM outbox")
        cpu0 = [process_cpu(c.pid) for c in children]
        with tracked(**{c.name: c.pid for c in children}), LoopMonitor() as monitor:
            while await conn.fetchval("SELECT count(*) FROM outbox") > 0:
                if time.monotonic() - t0 > 300:
                    raise TimeoutError("outbox not drained in 300 s")
                await asyncio.sleep(0.02)
            took = time.monotonic() - t0
        cpu = [process_cpu(c.pid) - c0 for c, c0 in zip(children, cpu0)]
    finally:
        for c in children:
            await asyncio.to_thread(stop_child, c)
        await conn.close()
    if left < cfg.relay_backlog / 2:
        note(f"relay processes ({relays}): only {left:,} of {cfg.relay_backlog:,} rows left once balanced")
    return {"rate": left / took, "left": left, "seconds": took, "monitor": monitor,
            "cpu_us": [c / max(1, left) * 1e6 for c in cpu]}


async def _raw_round(env: Env, cfg: Config) -> dict[str, Any]:
    topic = f"bench-throughput-{uuid.uuid4().hex[:8]}"
    await create_topic(env, topic)
    msg = sample_message()
    keys = [str(100_000 + i).encode() for i in range(cfg.relay_backlog)]
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all", linger_ms=0,
                                max_batch_size=1 << 20, request_timeout_ms=15000, retry_backoff_ms=100)
    await producer.start()
    try:
        await producer.client.force_metadata_update()
        await settle()
        with LoopMonitor() as monitor:
            t0 = time.monotonic()
            for start in range(0, len(keys), cfg.raw_batch):
                futures = [await producer.send(topic, msg.value, key=k, headers=msg.headers)
                           for k in keys[start:start + cfg.raw_batch]]
                await asyncio.gather(*futures)
            took = time.monotonic() - t0
    finally:
        await producer.stop()
    return {"rate": cfg.relay_backlog / took, "seconds": took, "monitor": monitor}


async def run(env: Env, cfg: Config) -> list[Line]:
    db = Database(env.url, service="orders")
    ours: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    procs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    run_dir = Path(tempfile.mkdtemp(prefix="mse-bench-relay-"))
    try:
        for r in range(cfg.relay_rounds):
            ours.append(await _relay_round(env, db, cfg))
            o = ours[-1]
            note(f"relay round {r + 1}/{cfg.relay_rounds}: {cfg.relay_backlog:,} rows in {o['seconds']:.2f} s "
                 f"= {o['rate']:,.0f}/s (startup {o['startup'] * 1000:.0f} ms, {o['batches']:.0f} batches, "
                 f"{o['errors']:.0f} errors; backlog written in {o['backlog_seconds']:.2f} s); "
                 f"{o['monitor'].summary()}")
            for n in procs:
                procs[n].append(await _process_round(env, db, cfg, n, run_dir))
                p = procs[n][-1]
                note(f"relay round {r + 1}/{cfg.relay_rounds}, {n} relay process(es): {p['left']:,} rows in "
                     f"{p['seconds']:.2f} s = {p['rate']:,.0f}/s; CPU µs/event "
                     + ", ".join(f"{c:.0f}" for c in p["cpu_us"]) + f"; {p['monitor'].summary()}")
            raw.append(await _raw_round(env, cfg))
            note(f"relay round {r + 1}/{cfg.relay_rounds} raw producer: {raw[-1]['seconds']:.2f} s "
                 f"= {raw[-1]['rate']:,.0f}/s; {raw[-1]['monitor'].summary()}")
    finally:
        await db.close()
        await execute(env, "DELETE FROM outbox")
    shutil.rmtree(run_dir, ignore_errors=True)
    note(f"relay events/s: {spread([o['rate'] for o in ours])}; raw: {spread([o['rate'] for o in raw])}")
    for n, rounds in procs.items():
        note(f"relay events/s, {n} process(es): {spread([o['rate'] for o in rounds])}")
    base = median([o["rate"] for o in raw])
    return [Line(f"relay events/s, {cfg.relay_backlog:,}-row backlog, in the benchmark's process "
                 f"(vs raw aiokafka producer)", median([o["rate"] for o in ours]), base, "/s", "reference"),
            Line(f"relay events/s, {cfg.relay_backlog:,}-row backlog, 1 relay process (vs raw aiokafka producer)",
                 median([o["rate"] for o in procs[1]]), base, "/s", "ratio >= 0.35",
                 lambda ours_, ratio: ratio >= 0.35),
            Line(f"relay events/s, {cfg.relay_backlog:,}-row backlog, 2 relay processes (vs raw aiokafka producer)",
                 median([o["rate"] for o in procs[2]]), base, "/s", "ratio >= 0.5",
                 lambda ours_, ratio: ratio >= 0.5),
            Line("relay CPU per event, 1 relay process", median([o["cpu_us"][0] for o in procs[1]]), float("nan"),
                 "µs", "reference"),
            Line("relay CPU per event, 2 relay processes (each)",
                 median([c for o in procs[2] for c in o["cpu_us"]]), float("nan"), "µs", "reference")]

"""Catch-up: a backlog of committed order writes, then the whole worker; events/s of every stage.

Each round, for each layout, on a fresh empty broker and a flushed embedded Redis:
1. N orders are committed through `Database` (ORM bulk inserts of 1,000 rows per commit), so
   the outbox holds N rows and nothing runs yet.
2. The layout's processes start, as operators run them (`python -m app worker`, `-l info`):
   - `one-worker`: one worker, which runs its relay as a child process (`RELAY_MODE=process`,
     the default);
   - `two-workers`: two workers (one consumer group, two web ports), each with its relay child
     (the two relays share the outbox shards);
   - with `BENCH_CATCHUP_LAYOUTS=one-worker,two-workers,relay-on-loop` also `relay-on-loop`:
     one worker with the relay on the agents' event loop (`RELAY_MODE=loop`, the old default).
3. Every stage is watched from outside the worker until it has all N, and its rate is taken
   from the first to the last visible (start-up and the group join are excluded):
   - relay: `SELECT count(*) FROM outbox` (rows left), every 25 ms;
   - `orders-v1`: messages on the topic (down-conversion), a consumer assigned to all partitions;
   - `orders` table: messages on its changelog topic (one per order: each key is written once
     per batch, and every key here is a new order);
   - stage 2: the sum of `orders_by_status` over the four statuses, read over HTTP as users
     read it (`/tables/`, which forwards to each key's owner), every 25 ms;
   - cache: `DBSIZE` of the Redis the worker refreshes (one key per order), every 25 ms.
   The CPU each process used over that span, per event, is reported with it.
4. Baseline, same broker as the `one-worker` layout: the naive Faust forwarding agent
   (`bench.faust_apps:naive`) copying the N events of `orders-v2` to another topic.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from app.embedded.broker import EmbeddedBroker
from app.embedded.process import free_port
from app.orm import Database
from bench.common import Config, Env, Line, execute, median, note, process_cpu, settle, spread
from bench.downconvert import _naive
from bench.relay_throughput import write_backlog
from bench.workers import (
    Child,
    CountReader,
    StreamConfig,
    app_worker_argv,
    child_env,
    create_topics,
    round_broker,
    run_with_redis,
    spawn,
    stop_child,
    topic_sizes,
    tracked,
)
from models.order import STATUSES

SOURCE = "orders-v2"
LAYOUTS = tuple(os.environ.get("BENCH_CATCHUP_LAYOUTS", "one-worker,two-workers").split(","))
STAGES = ("relay", "orders-v1", "orders table", "stage 2", "cache")


@dataclass
class Watch:
    """When a stage first showed progress and when it had all n."""

    first_at: float | None = None
    first_count: int = 0
    done_at: float | None = None
    last: int = 0

    def saw(self, count: int, now: float, n: int) -> None:
        """Record one observation of the stage's count."""
        self.last = count
        if count and self.first_at is None:
            self.first_at, self.first_count = now, count
        if count >= n and self.done_at is None:
            self.done_at = now

    def rate(self, n: int) -> float:
        """Events/s over the events that became visible after the first observation."""
        if self.first_at is None or self.done_at is None or self.done_at <= self.first_at:
            return float("nan")
        return (n - self.first_count) / (self.done_at - self.first_at)


@dataclass
class Outcome:
    """One layout's round."""

    rates: dict[str, float] = field(default_factory=dict)
    cpu_us: dict[str, float] = field(default_factory=dict)  # process -> µs per event
    seconds: float = 0.0


async def _poll(every: float, count: Callable[[], Awaitable[int]], watch: Watch, n: int,
                stop: asyncio.Event) -> None:
    while watch.done_at is None and not stop.is_set():
        with contextlib.suppress(Exception):  # a worker still starting refuses connections
            watch.saw(await count(), time.monotonic(), n)
        await asyncio.sleep(every)


async def _stage2(http: aiohttp.ClientSession, url: str) -> int:
    """Orders counted by `orders_by_status`, as users read it (`/tables/`, routed to each key's owner)."""
    total = 0
    for status in STATUSES:
        async with http.get(f"{url}/tables/orders_by_status/{status}/") as resp:
            body = await resp.json() if resp.status == 200 else None
            if resp.status != 200 and resp.status != 404:
                raise RuntimeError(f"{resp.status}")  # not ready yet: not an observation
        total += body["value"] if body else 0
    return total


async def _messages_per_event(broker: EmbeddedBroker, app_id: str, n: int, layout: str) -> None:
    """Print the messages the worker wrote to each of its own topics (table changelogs,
    repartition updates) per order event of the backlog: what issue 31 wants fewer of."""
    sizes = await topic_sizes(broker.url, app_id, own_only=True)
    note(f"catch-up {layout}: worker messages per order event {sum(sizes.values()) / n:.2f} "
         "(and 1 on orders-v1): " + ", ".join(f"{name} {count / n:.2f}" for name, count
                                             in sorted(sizes.items(), key=lambda kv: -kv[1])))


async def _layout(env: Env, layout: str, broker: EmbeddedBroker, redis_url: str, run_dir: Path, n: int,
                  timeout: float) -> Outcome:
    """Start the layout's processes on the backlog and watch every stage until it has n."""
    app_id = f"mse-bench-catchup-{uuid.uuid4().hex[:8]}"
    common = {"APP_ID": app_id, "DATABASE_URL": env.url, "KAFKA_BROKER": broker.url, "REDIS_URL": redis_url,
              "WEB_HOST": "127.0.0.1"}
    workers = 2 if layout == "two-workers" else 1
    relay_mode = "loop" if layout == "relay-on-loop" else "process"
    children: list[Child] = []
    urls: list[str] = []
    # Without Redis the worker runs no cache agent (so there is no cache stage to watch).
    watches = {stage: Watch() for stage in STAGES if redis_url or stage != "cache"}
    stop = asyncio.Event()
    conn = await asyncpg.connect(env.dsn)
    redis = Redis.from_url(redis_url) if redis_url else None
    readers = {"orders-v1": CountReader(broker.bootstrap, "orders-v1", n),
               "orders table": CountReader(broker.bootstrap, f"{app_id}-orders-changelog", n)}
    try:
        async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as http:
            # The table's changelog is created here, as the worker would create it, so that its
            # reader is counting before the worker starts.
            admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(f"{app_id}-orders-changelog", env.settings.topic_partitions, 1,
                                                    topic_configs={"cleanup.policy": "compact"})])
            finally:
                await admin.close()
            for reader in readers.values():
                await stack.enter_async_context(reader)
            t0 = time.monotonic()
            cpu0: dict[str, float] = {}
            for i in range(workers):
                port = free_port()
                env_i = child_env(**common, WEB_PORT=str(port), RELAY_MODE=relay_mode,
                                  FAUST_DATA_DIR=str(run_dir / f"{app_id}-{i + 1}-data"))
                children.append(spawn(f"worker-{i + 1}", app_worker_argv(), run_dir / f"{app_id}-{i + 1}.log",
                                      env_i, port))
                urls.append(children[-1].url)
            pollers = [
                _poll(0.025, lambda: conn.fetchval("SELECT $1::bigint - count(*) FROM outbox", n), watches["relay"],
                      n, stop),
                _poll(0.025, lambda: _stage2(http, urls[-1]), watches["stage 2"], n, stop),
            ]
            if redis is not None:
                pollers.append(_poll(0.025, redis.dbsize, watches["cache"], n, stop))
            tasks = [asyncio.ensure_future(p) for p in pollers]

            def done() -> bool:
                return (all(w.done_at is not None for s, w in watches.items() if s not in readers)
                        and all(r.done.is_set() for r in readers.values()))

            pids = {c.name: c.pid for c in children}

            def started() -> bool:
                return (any(w.first_at is not None for s, w in watches.items() if s not in readers)
                        or any(r.first.is_set() for r in readers.values()))

            with tracked(**pids):
                while not done():
                    if not cpu0 and started():
                        # CPU from the first output on: start-up and the group join are not per-event work.
                        cpu0 = {c.name: process_cpu(c.pid) for c in children}
                    for child in children:
                        if child.proc.poll() is not None:
                            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
                    if time.monotonic() - t0 > timeout:
                        left = {s: w.last for s, w in watches.items() if w.done_at is None}
                        left |= {s: r.count for s, r in readers.items() if not r.done.is_set()}
                        raise TimeoutError(f"{layout}: stages short of {n} after {timeout:.0f} s: {left}")
                    await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks)
            cpu = {name: process_cpu(pid) - cpu0[name] for name, pid in pids.items()}
            await _messages_per_event(broker, app_id, n, layout)
            out = Outcome()
            for stage, reader in readers.items():
                out.rates[stage] = reader.rate
            for stage, w in watches.items():
                if stage not in readers:
                    out.rates[stage] = w.rate(n)
            out.cpu_us = {name: c / n * 1e6 for name, c in cpu.items()}
            firsts = [w.first_at for w in watches.values() if w.first_at] + [r.first_at for r in readers.values()
                                                                            if r.first_at]
            lasts = [w.done_at for w in watches.values() if w.done_at] + [r.done_at for r in readers.values()
                                                                         if r.done_at]
            out.seconds = max(lasts) - min(firsts)
            return out
    finally:
        stop.set()
        for child in reversed(children):
            await asyncio.to_thread(stop_child, child)
        await conn.close()
        if redis is not None:
            await redis.aclose()


async def run(env: Env, cfg: Config) -> list[Line]:
    """Rounds of every layout, plus the naive forwarder on the one-worker layout's broker."""
    scfg = StreamConfig.make(cfg.quick)
    n = scfg.views_events
    rounds = scfg.views_rounds
    db = Database(env.url, service="orders")
    res: dict[str, list[Outcome]] = {layout: [] for layout in LAYOUTS}
    naive: list[float] = []
    try:
        async with run_with_redis(env, "catchup") as (run_dir, redis_server):
            for r in range(rounds):
                for layout in LAYOUTS:
                    tag = f"catch-up round {r + 1}/{rounds}, {layout}"
                    with round_broker(run_dir) as broker:
                        await create_topics(broker.bootstrap, [SOURCE, "orders-v1", f"{SOURCE}.dlq"],
                                            env.settings.topic_partitions)
                        await execute(env, "DELETE FROM outbox")
                        redis = Redis.from_url(redis_server.url)
                        await redis.flushall()
                        await redis.aclose()
                        took = await write_backlog(db, n, 1000)
                        await execute(env, "VACUUM ANALYZE outbox")
                        await settle()
                        o = await _layout(env, layout, broker, redis_server.url, run_dir, n, timeout=max(300.0, n / 20))
                        res[layout].append(o)
                        note(f"{tag}: backlog of {n:,} written in {took:.1f} s; "
                             + ", ".join(f"{s} {o.rates[s]:,.0f}/s" for s in STAGES)
                             + "; CPU µs/event " + ", ".join(f"{k} {v:.0f}" for k, v in o.cpu_us.items())
                             + f"; all stages in {o.seconds:.1f} s")
                        if layout == "one-worker":
                            nv = await _naive(env, broker, run_dir, n)
                            naive.append(nv["rate"])
                            note(f"{tag}: naive Faust forwarder {nv['rate']:,.0f}/s, "
                                 f"{nv['cpu_us']:.0f} µs of CPU per message")
    finally:
        await db.close()
    for layout in LAYOUTS:
        for stage in STAGES:
            note(f"catch-up {layout} {stage}: {spread([o.rates[stage] for o in res[layout]])}")
    base = median(naive)
    lines = []
    for layout in LAYOUTS:
        slowest = [min(o.rates[s] for s in STAGES if s != "relay") for o in res[layout]]
        for stage in STAGES:
            lines.append(Line(f"catch-up {n:,} committed orders, {layout}: {stage} events/s (vs naive Faust forwarder)",
                              median([o.rates[stage] for o in res[layout]]), base, "/s",
                              ">= 2,500 /s" if stage != "relay" else "reference",
                              (lambda ours, ratio: ours >= 2500) if stage != "relay" else None))
        lines.append(Line(f"catch-up, {layout}: slowest stream stage (vs naive Faust forwarder)", median(slowest), base,
                          "/s", "ratio >= 0.65", lambda ours, ratio: ratio >= 0.65))
        procs = sorted({k for o in res[layout] for k in o.cpu_us})
        for proc in procs:
            lines.append(Line(f"catch-up, {layout}: CPU per event, {proc}",
                              median([o.cpu_us.get(proc, float("nan")) for o in res[layout]]), float("nan"), "µs",
                              "reference", fmt="{:.0f}"))
    return lines

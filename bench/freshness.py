"""Freshness: commit -> visible in every stage, at 500 and 1,500 commits/s, the worker as users run it.

Each round, on a fresh empty broker and a flushed embedded Redis, one worker runs as the README
starts it (`python -m app worker`: relay inside, every agent, the Redis cache), and:
1. A writer process (`python -m bench.freshness write <rate> <seconds>`) commits one new Order
   every 1/rate s through `Database` (open loop: a slow commit never delays the next start)
   and reports each order's id and commit time. Writers, worker and observers are three
   processes, so none of them measures on a loop the others load.
2. This process observes every order without asking the worker anything (polling it over
   HTTP at 1,500/s would be load of its own; see bench/views.py):
   - delivery (the raw baseline): `orders-v2`, a consumer assigned to every partition: the
     partition, offset and time each order's event arrived;
   - `orders` table: its changelog topic. The worker writes a table entry and its changelog
     message at the same moment, so this is later than HTTP visibility by the producer's
     linger and one fetch;
   - stage 2 (`orders_by_status`): its changelog topic. A new order at (partition p, offset o)
     of `orders-v2` is counted once a `pending` value arrives whose part p has version >= o
     (stage 1 sends the offset of the last event it applied as the version);
   - cache: Redis keyspace notifications (`set` events of `entity:orders:<id>`), pushed by
     Redis itself when the worker's script writes the entry.
   Latency runs from the event's `occurred_at` (PostgreSQL's clock_timestamp() when the outbox
   row was written, just before the commit; read from the delivered event) to first seen, wall
   clock on one machine; p50/p99 over every order. The writer's own clock after its commit
   returned is not used: on a saturated machine its loop resumes the task tens of ms late, and
   events showed up "delivered before commit".
3. A catch-up first: 20,000 orders committed at once (`BENCH_FRESHNESS_BACKLOG`; ORM bulk
   inserts of 1,000), and the time until every stage has all of them. Issue 31 saw a >1 s p99
   at 200/s right after one: a writer at 200/s runs across its end, and the p99 of the
   orders it wrote in each second after the catch-up's last event was seen in every stage is
   reported (how long the tail lasts).
4. Rates: 200 then 500 commits/s, on the same worker, each once the previous has drained
   (`BENCH_FRESHNESS_RATES=200,500,1500` to choose others).
5. Layouts: where the worker runs its relay (`RELAY_MODE`): `process` (the default: a child
   it supervises), and with `BENCH_FRESHNESS_LAYOUTS=process,thread,loop,off` the others, to
   compare them (`off`: `python -m app relay` started beside the worker, as operators may).
   Targets (issue 31), p99 in every round, not only the median: at 500/s <= 100 ms to
   `orders-v2`, the table and the cache, <= 150 ms to stage 2; at 200/s <= 60 ms each.
   The writer's achieved rate is reported: on 2 cores the writer, the worker, the relay,
   Tansu, PostgreSQL and Redis share the CPU.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from app.embedded.redis import EmbeddedRedis
from app.wire.messages import decode
from app.wire.schemas import load
from bench.common import (
    SERVER_PIDS,
    Config,
    Env,
    Line,
    LoopMonitor,
    TailReader,
    execute,
    median,
    note,
    percentile,
    process_cpu,
    settle,
    spread,
)
from bench.workers import (
    Child,
    app_worker_argv,
    child_env,
    create_topics,
    faust_worker,
    round_broker,
    run_with_redis,
    spawn,
    stop_child,
    topic_sizes,
    tracked,
)

SOURCE = "orders-v2"
SOURCE_SCHEMA = ("orders", 2)
RATES = tuple(float(r) for r in os.environ.get("BENCH_FRESHNESS_RATES", "200,500").split(","))
STAGES = ("orders table", "stage 2", "cache")
#: Where the worker runs the relay (RELAY_MODE); the first is the default layout.
LAYOUTS = tuple(os.environ.get("BENCH_FRESHNESS_LAYOUTS", "process").split(","))
#: Settings for the worker to try, e.g. "CONSUMER_FETCH_MAX_WAIT_MS=20,RELAY_LINGER_MS=15".
WORKER_ENV = dict(item.split("=", 1) for item in os.environ.get("BENCH_FRESHNESS_WORKER_ENV", "").split(",") if item)
#: Orders committed at once before the rates (a catch-up the rates then follow).
BACKLOG = int(os.environ.get("BENCH_FRESHNESS_BACKLOG", "20000"))
#: A writer at this rate runs across the end of the catch-up, for this long (issue 31's tail).
AFTER_RATE, AFTER_SECONDS = 200.0, 26.0
#: p99 targets in ms, per rate and stage (issue 31); "delivery" is write -> `orders-v2`.
TARGETS = {(500.0, "delivery"): 100.0, (500.0, "orders table"): 100.0, (500.0, "cache"): 100.0,
           (500.0, "stage 2"): 150.0, (200.0, "delivery"): 60.0, (200.0, "orders table"): 60.0,
           (200.0, "cache"): 60.0, (200.0, "stage 2"): 60.0}


@dataclass
class Seen:
    """What the observers saw, wall-clock times."""

    delivered: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # key -> (p, offset, t)
    # key -> the event's `occurred_at` (PostgreSQL's clock_timestamp() when the outbox row was
    # written, just before the commit): the start of every latency.
    written: dict[str, float] = field(default_factory=dict)
    table: dict[str, float] = field(default_factory=dict)
    cache: dict[str, float] = field(default_factory=dict)
    # p -> [(t, version)] of each `pending` value of orders_by_status, in arrival order.
    stage2: dict[int, list[tuple[float, int]]] = field(default_factory=dict)

    def stage2_at(self, p: int, offset: int) -> float | None:
        """When stage 2 first counted the event at (p, offset)."""
        for t, version in self.stage2.get(p, ()):
            if version >= offset:
                return t
        return None


async def _observe(stack: contextlib.AsyncExitStack, bootstrap: str, app_id: str, redis: Redis,
                   seen: Seen) -> asyncio.Task[None]:
    """Start the four observers, each reading once this returns: three topic tails (closed with
    `stack`) and the cache's keyspace subscription (the task returned)."""
    schema = load(*SOURCE_SCHEMA)

    def delivered(m: Any, now: float) -> None:
        key = m.key.decode()
        if key not in seen.delivered:
            seen.delivered[key] = (m.partition, m.offset, now)
            seen.written[key] = decode(schema, m.value)["occurred_at"].timestamp()

    def table(m: Any, now: float) -> None:
        seen.table.setdefault(m.key.decode(), now)

    def stage2(m: Any, now: float) -> None:
        if m.key == b"pending" and m.value:
            for p, part in json.loads(m.value).get("parts", {}).items():
                seen.stage2.setdefault(int(p), []).append((now, int(part["version"])))

    async def cache(ready: asyncio.Event) -> None:
        await redis.config_set("notify-keyspace-events", "E$")  # keyevent notifications of string commands
        pubsub = redis.pubsub()
        await pubsub.psubscribe("__keyevent@*__:set")
        ready.set()
        try:
            async for message in pubsub.listen():
                if message["type"] == "pmessage":
                    name = message["data"].decode()
                    if name.startswith("entity:orders:"):
                        seen.cache.setdefault(name.rsplit(":", 1)[1], time.time())
        finally:
            await pubsub.aclose()

    for topic, on in ((SOURCE, delivered), (f"{app_id}-orders-changelog", table),
                      (f"{app_id}-orders_by_status-changelog", stage2)):
        await stack.enter_async_context(TailReader(bootstrap, topic, on))
    subscribed = asyncio.Event()
    task = asyncio.ensure_future(cache(subscribed))
    await asyncio.wait_for(subscribed.wait(), 30)
    return task


async def _write(env: Env, run_dir: Path, rate: float, seconds: float, worker: Child
                 ) -> tuple[dict[str, float], float, str]:
    """Run the writer process; (order id -> commit time, achieved rate, CPU breakdown)."""
    out = run_dir / f"writer-{rate:.0f}.out"
    out.unlink(missing_ok=True)  # an earlier round's
    child = spawn(f"writer-{rate:.0f}", [sys.executable, "-m", "bench.freshness", "write", str(rate), str(seconds),
                                          str(out)], run_dir / "writer.log", child_env(DATABASE_URL=env.url))
    try:
        # The writer stays alive once done (until stopped below), so the monitor can read its CPU.
        with tracked(writer=child.pid, worker=worker.pid), LoopMonitor() as monitor:
            while not out.exists():
                if child.proc.poll() is not None:
                    raise RuntimeError(f"writer exited with {child.proc.returncode}:\n{child.tail()}")
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(stop_child, child)
    lines = out.read_text().split("\n")
    achieved, cpu = map(float, lines[0].split())
    commits = {k: float(t) for k, t in (line.split() for line in lines[1:] if line)}
    # The writer's CPU per commit from its own count (without its start-up and idle wait).
    return commits, achieved, f"{monitor.summary()}; writer {cpu / max(1, len(commits)) * 1e6:.0f} µs of CPU per commit"


def _latencies(commits: dict[str, float], seen: Seen) -> dict[str, list[float]]:
    """ms from the write (the event's `occurred_at`) to each stage (and delivery) for every order seen there.

    Not the writer's own clock after the commit returned: on a saturated machine its event loop
    resumes the committing task tens of ms late, after the event was already delivered.
    """
    out: dict[str, list[float]] = {s: [] for s in ("delivery", *STAGES)}
    for key in commits:
        d = seen.delivered.get(key)
        t = seen.written.get(key)
        if d is None or t is None:
            continue  # missing everywhere: counted by _wait_all
        out["delivery"].append((d[2] - t) * 1000)
        s2 = seen.stage2_at(d[0], d[1])
        if s2 is not None:
            out["stage 2"].append((s2 - t) * 1000)
        if key in seen.table:
            out["orders table"].append((seen.table[key] - t) * 1000)
        if key in seen.cache:
            out["cache"].append((seen.cache[key] - t) * 1000)
    return out


async def _wait_all(commits: dict[str, float], seen: Seen, timeout: float) -> dict[str, int]:
    """Wait until every order is seen in every stage; the count missing per stage."""
    deadline = time.monotonic() + timeout
    while True:
        lat = _latencies(commits, seen)
        missing = {s: len(commits) - len(v) for s, v in lat.items()}
        if not any(missing.values()) or time.monotonic() > deadline:
            return missing
        await asyncio.sleep(0.1)


async def _round(env: Env, run_dir: Path, redis_server: EmbeddedRedis, seconds: float, layout: str
                 ) -> dict[float, dict[str, Any]]:
    """One worker (and, for `off`, a relay process beside it) on a fresh broker; each rate in turn."""
    out: dict[float, dict[str, Any]] = {}
    relay: Child | None = None
    with round_broker(run_dir) as broker:
        await create_topics(broker.bootstrap, [SOURCE, "orders-v1", f"{SOURCE}.dlq"], env.settings.topic_partitions)
        await execute(env, "DELETE FROM outbox")
        redis = Redis.from_url(redis_server.url)
        await redis.flushall()
        tasks: list[asyncio.Task[None]] = []
        try:
            async with contextlib.AsyncExitStack() as readers, faust_worker(
                    "freshness", app_worker_argv(), run_dir, DATABASE_URL=env.url, KAFKA_BROKER=broker.url,
                    REDIS_URL=redis_server.url, RELAY_MODE=layout, **WORKER_ENV) as w:
                if layout == "off":
                    relay = spawn("relay", [sys.executable, "-m", "app", "relay"], run_dir / "relay.log",
                                  child_env(DATABASE_URL=env.url, KAFKA_BROKER=broker.url, RELAY_WEB_PORT="0"))
                app_id = w.log.stem
                await _wait_topics(broker.bootstrap, [f"{app_id}-orders-changelog",
                                                      f"{app_id}-orders_by_status-changelog"])
                seen = Seen()
                tasks = [await _observe(readers, broker.bootstrap, app_id, redis, seen)]
                # Warm-up: the group has joined and every stage is live once these are seen.
                warm, _, _ = await _write(env, run_dir, 50, 2, w)
                missing = await _wait_all(warm, seen, 120)
                if any(missing.values()):
                    raise RuntimeError(f"warm-up orders missing after 120 s: {missing}")
                if BACKLOG:
                    # The writer runs across the end of the catch-up: what follows a catch-up
                    # at once, with no idle moment in between, is what issue 31 saw late.
                    writer = asyncio.ensure_future(_write(env, run_dir, AFTER_RATE, AFTER_SECONDS, w))
                    await asyncio.sleep(2.0)  # its start-up; then the backlog, at once
                    out[0.0] = await _catch_up(env, seen, BACKLOG)
                    commits, _, _ = await writer
                    await _wait_all(commits, seen, 60)
                    done = out[0.0]["done_at"]
                    # p99 per second after the catch-up's end: how long its tail lasts.
                    buckets: dict[int, dict[str, float]] = {}
                    for second in range(int(AFTER_SECONDS)):
                        part = {k: t for k, t in commits.items()
                                if done + second <= seen.written.get(k, 0.0) < done + second + 1}
                        if len(part) >= 50:
                            lat = _latencies(part, seen)
                            buckets[second] = {stage: percentile(v, 99) for stage, v in lat.items()}
                    out[0.0]["after"] = buckets
                    note(f"freshness {layout}: p99 of the orders written at {AFTER_RATE:.0f}/s in each second "
                         "after the catch-up's last event was seen everywhere: " + "; ".join(
                             f"+{sec} s: " + ", ".join(f"{st} {v:.0f}" for st, v in b.items())
                             for sec, b in buckets.items()))
                pids = {"worker": w.pid, "relay": relay.pid if relay is not None else _relay_child(w.pid),
                        "tansu": broker.pid, "redis": redis_server.pid, "postgres": SERVER_PIDS.get("postgres")}
                for rate in RATES:
                    await settle()
                    sizes0, batches0 = await topic_sizes(broker.url, app_id), await _relay_batches(w)
                    idle0 = _cpu_parts(pids)
                    await asyncio.sleep(2.0)  # idle: what polling costs with the topics as they are now
                    cpu0 = _cpu_parts(pids)
                    note(f"freshness {layout} before {rate:.0f}/s, idle, in cores: " + ", ".join(
                        f"{n} {(cpu0[n] - idle0[n]) / 2.0:.2f}" for n in cpu0))
                    commits, achieved, machine = await _write(env, run_dir, rate, seconds, w)
                    missing = await _wait_all(commits, seen, 60)
                    cpu1 = _cpu_parts(pids)
                    sizes1, batches1 = await topic_sizes(broker.url, app_id), await _relay_batches(w)
                    lat = _latencies(commits, seen)
                    per_event = {name: (cpu1[name] - cpu0[name]) / max(1, len(commits)) * 1e6 for name in cpu1}
                    messages = {t: (sizes1.get(t, 0) - sizes0.get(t, 0)) / max(1, len(commits)) for t in sizes1}
                    r = {"achieved": achieved, "n": len(commits), "missing": missing,
                         "cpu_us": per_event["worker"], "cpu": per_event, "messages": messages,
                         "relay batches": (batches1 - batches0) / max(1, len(commits))}
                    note(f"freshness {layout} {rate:.0f}/s: relay batches per commit {r['relay batches']:.2f}; "
                         f"messages per commit {sum(messages.values()):.2f}: " + ", ".join(
                             f"{t} {v:.2f}" for t, v in sorted(messages.items(), key=lambda kv: -kv[1]) if v))
                    for stage, values in lat.items():
                        r[stage] = (percentile(values, 50), percentile(values, 99))
                    out[rate] = r
                    note(f"freshness {layout} {rate:.0f}/s: {len(commits):,} commits at {achieved:.0f}/s; "
                         + ", ".join(f"{s} p50 {r[s][0]:.1f} / p99 {r[s][1]:.1f} ms" for s in ("delivery", *STAGES))
                         + f"; missing {missing}; CPU µs/commit "
                         + ", ".join(f"{n} {v:.0f}" for n, v in per_event.items()) + f"; {machine}")
        finally:
            if relay is not None:
                await asyncio.to_thread(stop_child, relay)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await redis.aclose()
    return out


async def _catch_up(env: Env, seen: Seen, n: int) -> dict[str, Any]:
    """Commit `n` orders at once; seconds until each stage has them all, and its rate."""
    from sqlalchemy import insert

    from app.orm import Database
    from models.order import Order

    db = Database(env.url, service="orders")
    t0 = time.time()
    keys: dict[str, float] = {}
    try:
        for start in range(0, n, 1000):
            async with db.session() as s:
                ids = (await s.execute(insert(Order).returning(Order.id), [
                    {"customer_id": 7, "amount_cents": 1999, "currency": "EUR"}] * min(1000, n - start))).scalars()
                keys.update((str(i), t0) for i in ids)
    finally:
        await db.close()
    missing = await _wait_all(keys, seen, 300)
    last = {"delivery": max((seen.delivered[k][2] for k in keys if k in seen.delivered), default=t0),
            "orders table": max((seen.table[k] for k in keys if k in seen.table), default=t0),
            "cache": max((seen.cache[k] for k in keys if k in seen.cache), default=t0)}
    r = {"missing": missing, "done_at": max(last.values()), **{f"{stage} s": t - t0 for stage, t in last.items()}}
    note(f"freshness catch-up of {n:,}: " + ", ".join(f"{stage} all in {t - t0:.1f} s ({n / max(t - t0, 1e-9):,.0f}/s)"
                                                      for stage, t in last.items()) + f"; missing {missing}")
    return r


async def _relay_batches(worker: Child) -> float:
    """`mse_relay_batches_total` from the worker's /metrics (its relay, in whatever mode)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(f"{worker.url}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "mse_relay_batches":
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    return float("nan")


def _relay_child(worker: int) -> int | None:
    """The PID of the relay process a worker in RELAY_MODE=process supervises, if any."""
    import psutil

    for child in psutil.Process(worker).children():
        with contextlib.suppress(psutil.Error):
            if "relay" in child.cmdline():
                return int(child.pid)
    return None


def _cpu_parts(pids: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds so far of each part; the worker's own, without its relay child's."""
    import psutil

    out = {}
    for name, pid in pids.items():
        if pid is None:
            continue
        if name == "worker":
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        else:
            out[name] = process_cpu(pid)
    return out


async def _wait_topics(bootstrap: str, topics: list[str], timeout: float = 60) -> None:
    """Wait until the worker created its table changelog topics."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while not set(topics) <= await consumer.topics():
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {topics} not created in {timeout:.0f} s")
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()


async def run(env: Env, cfg: Config) -> list[Line]:
    """Rounds of each layout at every rate: medians of each round's p50 and p99, and the worst p99
    (the targets hold in every round, not only the median one)."""
    rounds, seconds = (1, 3.0) if cfg.quick else (int(os.environ.get("BENCH_FRESHNESS_ROUNDS", "5")), 10.0)
    res: dict[str, list[dict[float, dict[str, Any]]]] = {layout: [] for layout in LAYOUTS}
    async with run_with_redis(env, "freshness") as (run_dir, redis_server):
        with tracked(redis=redis_server.pid):
            for r in range(rounds):
                for layout in LAYOUTS:
                    note(f"freshness round {r + 1}/{rounds}, RELAY_MODE={layout}")
                    res[layout].append(await _round(env, run_dir, redis_server, seconds, layout))
    lines = []
    for layout in LAYOUTS:
        got = res[layout]
        if BACKLOG:
            slowest = [max(x[0.0][f"{stage} s"] for stage in ("orders table", "cache")) for x in got]
            lines.append(Line(f"catch-up of {BACKLOG:,} orders committed at once, before the rates, slowest of "
                              f"table and cache, RELAY_MODE={layout} (vs delivery on orders-v2)",
                              BACKLOG / median(slowest), BACKLOG / median([x[0.0]["delivery s"] for x in got]),
                              "/s", "reference"))
            seconds_after = sorted({sec for x in got for sec in x[0.0]["after"]})
            for sec in seconds_after[:6]:
                worst = max(x[0.0]["after"][sec]["orders table"] for x in got if sec in x[0.0]["after"])
                lines.append(Line(
                    f"write -> orders table p99 at {AFTER_RATE:.0f} commits/s, orders written {sec}-{sec + 1} s after "
                    f"the catch-up's end (a writer running across it), RELAY_MODE={layout}: "
                    f"median (worst {worst:.0f} ms)",
                    median([x[0.0]["after"][sec]["orders table"] for x in got if sec in x[0.0]["after"]]),
                    median([x[0.0]["after"][sec]["delivery"] for x in got if sec in x[0.0]["after"]]), "ms",
                    "reference", fmt="{:.1f}"))
        for rate in RATES:
            achieved = median([x[rate]["achieved"] for x in got])
            note(f"freshness {layout} {rate:.0f}/s: writer achieved {spread([x[rate]['achieved'] for x in got])}/s")
            where = f"RELAY_MODE={layout}{' (default)' if layout == 'process' else ''}, {len(got)} rounds"
            for stage in ("delivery", *STAGES):
                name = "orders-v2" if stage == "delivery" else stage
                # Stages against delivery on orders-v2; delivery against nothing measured here
                # (the latency benchmark has raw produce -> consume).
                base = (lambda i: median([x[rate]["delivery"][i] for x in got])) if stage != "delivery" else (
                    lambda i: float("nan"))
                lines.append(Line(f"write -> {name} p50 at {rate:,.0f} commits/s, {where} (achieved {achieved:,.0f}/s)",
                                  median([x[rate][stage][0] for x in got]), base(0), "ms", "reference", fmt="{:.1f}"))
                target = TARGETS.get((rate, stage))
                worst = max(x[rate][stage][1] for x in got)
                lines.append(Line(
                    f"write -> {name} p99 at {rate:,.0f} commits/s, {where}: median (worst round {worst:.0f} ms)",
                    median([x[rate][stage][1] for x in got]), base(1), "ms",
                    f"<= {target:.0f} ms every round" if target else "reference",
                    (lambda ours_, ratio, t=target, w=worst: w <= t) if target else None, fmt="{:.1f}"))
            parts = sorted({n for x in got for n in x[rate]["cpu"]})
            note(f"freshness {layout} {rate:.0f}/s CPU µs per commit (median of rounds): " + ", ".join(
                f"{n} {median([x[rate]['cpu'][n] for x in got if n in x[rate]['cpu']]):.0f}" for n in parts))
            for n in parts:
                lines.append(Line(f"CPU per order event at {rate:,.0f} commits/s, {where}: {n}",
                                  median([x[rate]["cpu"][n] for x in got if n in x[rate]["cpu"]]), float("nan"),
                                  "µs", "reference"))
    return lines


def _writer_main(rate: float, seconds: float, out: Path) -> None:
    """The writer process: commit new Orders at `rate`/s for `seconds`, write ids and commit times to `out`."""
    import os

    from app.orm import Database
    from bench.common import paced
    from models.order import Order

    async def main() -> None:
        db = Database(os.environ["DATABASE_URL"], service="orders")
        commits: list[tuple[int, float]] = []
        t0 = time.time()

        # The schedule stays open-loop; a commit waits for one of the pool's connections here
        # instead of in the pool, whose checkout gives up after 30 s when the writer falls behind.
        slots = asyncio.Semaphore(20)

        async def fire(i: int) -> None:
            async with slots, db.session() as s:
                order = Order(customer_id=i % 1000, amount_cents=1999, currency="EUR")
                s.add(order)
            commits.append((order.id, time.time()))

        try:
            await paced(rate, seconds, fire)
        finally:
            await db.close()
        # Achieved: commits over the time to the last one (a writer that falls behind its
        # schedule shows a lower rate than the schedule's).
        achieved = len(commits) / (max(t for _, t in commits) - t0) if commits else 0.0
        part = out.with_suffix(".part")
        part.write_text(f"{achieved} {time.process_time()}\n" + "".join(f"{k} {t}\n" for k, t in commits))
        part.rename(out)  # complete, at once

    asyncio.run(main())
    time.sleep(3600)  # stopped by the benchmark, which reads this process's CPU first


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "write":
        _writer_main(float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit("usage: python -m bench.freshness write <rate> <seconds> <out file>")

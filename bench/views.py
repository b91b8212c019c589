"""Materialized views: events/s applied, commit -> visible lag, idle cost of the fetch wait, lookups/s.

Each round has two phases, each on a fresh, empty broker with our worker (`python -m app
worker`, a consumer group of its own):

1. Fetch wait 10 ms (`CONSUMER_FETCH_MAX_WAIT_MS=10`, our default). `orders-v2` is pre-filled
   with N create events (4 statuses, 1,000 customers) before the worker starts; the raw
   aiokafka copy loop (`bench.raw_baselines copy`) copies the same N on the same broker first.
   - events/s: every 25 ms, `GET /table/orders_by_status/<status>/` for the 4 statuses and
     `GET /table/orders_per_minute/<minute>/` (Faust's table endpoint: the stored
     `{"parts": {p: {"version", "value"}}}`; the pre-filled orders share one minute); the
     time from the first poll where both views count some orders to the first where both
     count N, for the events not yet counted at the first one (start-up and group join are
     excluded). Both are stage-2 views, so every event went through both stages.
   - idle CPU: the worker process's CPU (/proc via psutil) over `idle_seconds` once caught up.
   - lookups/s: 8 concurrent aiohttp clients doing `GET /table/orders/<id>/` of pre-filled
     orders; baseline: a plain aiohttp server child answering the same path from a dict.
   - commit -> visible: Orders committed through `Database` at 500/s (open loop); the worker's
     relay publishes them. Every 10th order is timed until its entry in the `orders` table is
     seen on the table's changelog by a consumer of ours (no load on the worker; see `_lag`),
     and checked once over HTTP after the round. Baseline: commit -> delivery on `orders-v2`
     (a consumer assigned to every partition) of the same orders, same round.
2. Fetch wait 1500 ms (Faust's default): idle CPU and commit -> visible, measured the same way.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

from app.embedded.broker import EmbeddedBroker
from app.embedded.process import free_port
from app.orm import Database
from bench.common import Config, Env, Line, LoopMonitor, TailReader, execute, median, note, process_cpu, settle, spread
from bench.workers import (
    PREFILL_KEY_BASE,
    SHARED,
    Child,
    CountReader,
    StreamConfig,
    app_worker_argv,
    child_env,
    commit_to_visible,
    create_topics,
    faust_worker,
    fmt_visible,
    prefill,
    round_broker,
    spawn,
    stop_child,
    tracked,
    v2_events,
    wait_event,
    wait_for_log,
)
from models.order import ORDERS_PER_MINUTE, STATUSES

SOURCE = "orders-v2"


async def _get_json(http: aiohttp.ClientSession, url: str) -> Any:
    """JSON of a 200, None of a 404."""
    async with http.get(url) as resp:
        if resp.status == 404:
            await resp.read()
            return None
        resp.raise_for_status()
        return await resp.json()


def _counted(stored: Any) -> int:
    """A counted view's stored value as readers see it: the sum of its parts."""
    return sum(part["value"] or 0 for part in stored["parts"].values()) if stored else 0


async def _applied(http: aiohttp.ClientSession, base: str, minute: int) -> int:
    """Orders counted by both `orders_by_status` (over all statuses) and `orders_per_minute`."""
    stored = await asyncio.gather(*(_get_json(http, f"{base}/table/orders_by_status/{s}/") for s in STATUSES),
                                  _get_json(http, f"{base}/table/orders_per_minute/{minute}/"))
    return min(sum(_counted(v) for v in stored[:-1]), _counted(stored[-1]))


async def _apply_rate(http: aiohttp.ClientSession, worker: Child, n: int, minute: int,
                      timeout: float) -> dict[str, Any]:
    """Poll the counted views until both count n orders; rate over the events applied while polled."""
    deadline = time.monotonic() + timeout
    first: tuple[float, int] | None = None
    monitor: LoopMonitor | None = None
    with tracked(worker=worker.pid):
        while True:
            total = await _applied(http, worker.url, minute)
            now = time.monotonic()
            if total and first is None:
                first = (now, total)
                cpu0 = process_cpu(worker.pid)
                monitor = LoopMonitor().__enter__()
            if total >= n:
                break
            if worker.proc.poll() is not None or now > deadline:
                raise RuntimeError(f"views counted {total} of {n} orders:\n{worker.tail()}")
            await asyncio.sleep(0.025)
        cpu = process_cpu(worker.pid) - cpu0
        assert monitor is not None and first is not None
        monitor.__exit__(None, None, None)
    seconds = now - first[0]
    applied = n - first[1]
    return {"rate": applied / seconds if seconds > 0 else float("nan"), "seconds": seconds, "applied": applied,
            "cpu_us": cpu / max(applied, 1) * 1e6, "monitor": monitor}


async def _raw_copy(env: Env, broker: EmbeddedBroker, run_dir: Path, n: int) -> float:
    """The raw aiokafka copy loop's messages/s on this broker's pre-filled `orders-v2`."""
    out = f"bench-copy-{time.monotonic_ns()}"
    await create_topics(broker.bootstrap, [out], env.settings.topic_partitions)
    async with CountReader(broker.bootstrap, out, n) as reader:
        child = spawn("raw", [sys.executable, "-m", "bench.raw_baselines", "copy", broker.bootstrap, SOURCE, out,
                              str(n), "--fetch-wait-ms", str(env.settings.consumer_fetch_max_wait_ms)],
                      run_dir / f"{out}.log", child_env())
        try:
            await wait_event(reader.done, 300, child, f"{n} messages on {out}")
        finally:
            await asyncio.to_thread(stop_child, child)
    return reader.rate


async def _idle_cpu(worker: Child, broker: EmbeddedBroker, seconds: float) -> tuple[float, float]:
    """(worker cores, broker cores) while nothing is produced."""
    t0 = time.monotonic()
    w0, b0 = process_cpu(worker.pid), process_cpu(broker.pid)
    await asyncio.sleep(seconds)
    wall = time.monotonic() - t0
    return (process_cpu(worker.pid) - w0) / wall, (process_cpu(broker.pid) - b0) / wall


async def _lookups(base: str, keys: list[str], clients: int, seconds: float) -> float:
    """GET /table/orders/<key>/ per second with `clients` concurrent clients (200s only)."""
    done = 0

    async def client(http: aiohttp.ClientSession, rng: random.Random, until: float) -> None:
        nonlocal done
        while time.monotonic() < until:
            async with http.get(f"{base}/table/orders/{rng.choice(keys)}/") as resp:
                await resp.read()
                if resp.status == 200:
                    done += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        await asyncio.gather(*(client(http, random.Random(i), time.monotonic() + 0.2) for i in range(clients)))
        done = 0
        t0 = time.monotonic()
        await asyncio.gather(*(client(http, random.Random(i), t0 + seconds) for i in range(clients)))
        return done / (time.monotonic() - t0)


async def _lag(db: Database, http: aiohttp.ClientSession, worker: Child, broker: EmbeddedBroker,
               scfg: StreamConfig, seconds: float) -> dict[str, Any]:
    """Commit -> in the `orders` table (sampled), and commit -> delivery on orders-v2, at scfg.lag_rate.

    "In the table" is seen on the table's changelog topic, read back by a consumer of ours: the
    worker writes the entry and its changelog message at the same moment, so this is later than
    HTTP visibility by the producer's linger and one fetch (<= ~12 ms), and it puts no load on
    the worker. Polling every pending order over HTTP every 2 ms did: at 500 commits/s that was
    2,000-4,000 requests/s, a fifth of the worker's CPU, and latency fed on itself. After the
    round every sampled order is checked once over HTTP (`http_missing`).
    """
    changelog = f"{worker.log.stem}-orders-changelog"  # the worker's log is named after its app id
    async with TailReader(broker.bootstrap, SOURCE) as tail, TailReader(broker.bootstrap, changelog) as applied:

        async def visible(key: str) -> bool:
            return key in applied.received

        with tracked(worker=worker.pid), LoopMonitor() as monitor:
            r = await commit_to_visible(db, tail, visible, scfg.lag_rate, seconds, scfg.lag_sample_every,
                                        scfg.lag_poll_interval, timeout=60)
    r["monitor"] = monitor
    r["http_missing"] = 0
    for key in r["sampled_keys"]:
        async with http.get(f"{worker.url}/table/orders/{key}/") as resp:
            await resp.read()
            r["http_missing"] += resp.status != 200
    return r


@contextlib.asynccontextmanager
async def _phase(env: Env, run_dir: Path) -> AsyncIterator[EmbeddedBroker]:
    """A fresh broker with our topics created."""
    with round_broker(run_dir) as broker:
        await create_topics(broker.bootstrap, [SOURCE, "orders-v1", f"{SOURCE}.dlq"], env.settings.topic_partitions)
        yield broker


async def run(env: Env, cfg: Config) -> list[Line]:
    """Rounds of the 10 ms and the 1500 ms phase."""
    scfg = StreamConfig.make(cfg.quick)
    n = scfg.views_events
    created = datetime.now(timezone.utc)
    events = v2_events(n, created)
    minute = ORDERS_PER_MINUTE.start(int(created.timestamp() * 1_000_000))
    keys = [str(PREFILL_KEY_BASE + i) for i in range(n)]
    res: dict[str, list[Any]] = {k: [] for k in ("apply", "raw", "idle10", "idle1500", "broker10", "broker1500",
                                                 "lookups", "raw_lookups", "lag10", "lag1500")}
    run_dir = Path(tempfile.mkdtemp(prefix="mse-bench-views-"))
    db = Database(env.url, service="orders")
    port = free_port()
    server = spawn("raw-http", [sys.executable, "-m", "bench.raw_baselines", "http", str(port), str(n)],
                   run_dir / "raw-http.log", child_env(), port)
    ok = False
    try:
        await wait_for_log(server, "READY", 60)
        for r in range(scfg.views_rounds):
            tag = f"views round {r + 1}/{scfg.views_rounds}"
            async with _phase(env, run_dir) as broker:
                took = await prefill(broker.bootstrap, SOURCE, events)
                res["raw"].append(await _raw_copy(env, broker, run_dir, n))
                note(f"{tag}: {n:,} events pre-filled in {took:.2f} s; raw copy loop {res['raw'][-1]:,.0f}/s")
                await execute(env, "DELETE FROM outbox")  # the worker's relay must publish only this round's orders
                await settle()
                async with faust_worker("views-10ms", app_worker_argv(), run_dir, DATABASE_URL=env.url,
                                        KAFKA_BROKER=broker.url, CONSUMER_FETCH_MAX_WAIT_MS="10") as w, \
                        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as http:
                    a = await _apply_rate(http, w, n, minute, timeout=max(120.0, n / 20))
                    res["apply"].append(a)
                    note(f"{tag} 10 ms: {a['applied']:,} events applied in {a['seconds']:.2f} s = {a['rate']:,.0f}/s, "
                         f"{a['cpu_us']:.0f} µs of worker CPU per event; {a['monitor'].summary()}")
                    await asyncio.sleep(1.0)  # the stage-2 agents finish their last updates
                    idle = await _idle_cpu(w, broker, scfg.idle_seconds)
                    res["idle10"].append(idle[0])
                    res["broker10"].append(idle[1])
                    note(f"{tag} 10 ms: idle CPU worker {idle[0]:.3f} cores, broker {idle[1]:.3f} cores")
                    res["lookups"].append(await _lookups(w.url, keys, scfg.lookup_clients, scfg.lookup_seconds))
                    res["raw_lookups"].append(await _lookups(server.url, keys, scfg.lookup_clients,
                                                             scfg.lookup_seconds))
                    note(f"{tag}: lookups/s worker {res['lookups'][-1]:,.0f}, "
                         f"plain aiohttp {res['raw_lookups'][-1]:,.0f}")
                    await _lag(db, http, w, broker, scfg, 0.3)  # warm-up: pools, relay, statement caches
                    await settle()
                    res["lag10"].append(await _lag(db, http, w, broker, scfg, scfg.lag_seconds))
                    note(f"{tag} 10 ms: {fmt_visible(res['lag10'][-1])}; {res['lag10'][-1]['monitor'].summary()}")
            async with _phase(env, run_dir) as broker:
                await execute(env, "DELETE FROM outbox")
                async with faust_worker("views-1500ms", app_worker_argv(), run_dir, DATABASE_URL=env.url,
                                        KAFKA_BROKER=broker.url, CONSUMER_FETCH_MAX_WAIT_MS="1500") as w, \
                        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as http:
                    await _lag(db, http, w, broker, scfg, 0.3)  # warm-up, and the group has joined once it is seen
                    await asyncio.sleep(1.0)
                    idle = await _idle_cpu(w, broker, scfg.idle_seconds)
                    res["idle1500"].append(idle[0])
                    res["broker1500"].append(idle[1])
                    note(f"{tag} 1500 ms: idle CPU worker {idle[0]:.3f} cores, broker {idle[1]:.3f} cores")
                    await settle()
                    res["lag1500"].append(await _lag(db, http, w, broker, scfg, scfg.lag_seconds))
                    note(f"{tag} 1500 ms: {fmt_visible(res['lag1500'][-1])}; "
                         f"{res['lag1500'][-1]['monitor'].summary()}")
        ok = True
    finally:
        await asyncio.to_thread(stop_child, server)
        await db.close()
        with contextlib.suppress(Exception):
            await execute(env, "DELETE FROM outbox")
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            note(f"views: logs kept in {run_dir}")
    rates = [a["rate"] for a in res["apply"]]
    note(f"views events/s: {spread(rates)}; raw copy loop: {spread(res['raw'])}")
    missing = [x["missing"] for x in res["lag10"] + res["lag1500"]]
    if any(missing):
        note(f"WARNING: sampled orders never seen in the view: {missing}")
    http_missing = [x["http_missing"] for x in res["lag10"] + res["lag1500"]]
    if any(http_missing):
        note(f"WARNING: sampled orders on the changelog but not served over HTTP: {http_missing}")

    def lag(phase: str, q: str) -> float:
        return median([x[q] for x in res[phase]])

    rate = f"{scfg.lag_rate:.0f}/s"
    lines = [
        Line(f"views events/s, {n:,} pre-filled, all views (vs raw aiokafka copy loop)", median(rates),
             median(res["raw"]), "/s", "reference"),
    ]
    if "naive_rate" in SHARED:
        lines.append(Line("views events/s (vs naive Faust forwarder of the downconvert benchmark)", median(rates),
                          SHARED["naive_rate"], "/s", "reference"))
    lines += [
        Line(f"commit -> view visible p50 at {rate} (vs commit -> delivery on orders-v2)", lag("lag10", "p50"),
             lag("lag10", "delivery_p50"), "ms", "reference", fmt="{:.1f}"),
        Line(f"commit -> view visible p99 at {rate} (vs commit -> delivery on orders-v2)", lag("lag10", "p99"),
             lag("lag10", "delivery_p99"), "ms", "<= 60 ms", lambda ours_, ratio: ours_ <= 60, fmt="{:.1f}"),
        Line("commit -> view visible p50, fetch wait 1500 ms (Faust's default) (vs delivery)",
             lag("lag1500", "p50"), lag("lag1500", "delivery_p50"), "ms", "reference", fmt="{:.1f}"),
        Line("commit -> view visible p99, fetch wait 1500 ms (Faust's default) (vs delivery)",
             lag("lag1500", "p99"), lag("lag1500", "delivery_p99"), "ms", "reference", fmt="{:.1f}"),
        Line("idle worker CPU, fetch wait 10 ms (vs 1500 ms)", median(res["idle10"]), median(res["idle1500"]),
             "cores", "reference", fmt="{:.3f}"),
        Line("idle broker CPU serving that worker, fetch wait 10 ms (vs 1500 ms)", median(res["broker10"]),
             median(res["broker1500"]), "cores", "reference", fmt="{:.3f}"),
        Line(f"key lookups/s over HTTP, {scfg.lookup_clients} clients, one worker (vs plain aiohttp dict server)",
             median(res["lookups"]), median(res["raw_lookups"]), "/s", "reference"),
    ]
    return lines

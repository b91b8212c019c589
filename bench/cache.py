"""Redis entity cache: commit -> cache refreshed, and cached reads/s vs raw Redis and the database.

An embedded Redis and a fresh, empty broker are started for this benchmark; our worker
(`python -m app worker` with `REDIS_URL`) runs its cache-refresh agent on them.

- commit -> refreshed: Orders committed through `Database` at 500/s (open loop); the worker's
  relay publishes them and its agent writes `entity:orders:<id>`. Every 10th order's key is
  polled (EXISTS, all pending keys concurrently, every 2 ms) until it is there. Baseline:
  commit -> delivery on `orders-v2` of the same orders, in the same round.
- reads/s: the worker is stopped, then, on the keys of every order committed above (all in
  Redis: the cache is warm), for `read_seconds` each, in rotating order per round:
  `CacheRepository.get(Order, id)` with 1 and 8 tasks; a plain `redis.asyncio` client's GET
  with 1 and 8 tasks, and pipelined (100 GETs per round trip); and `select(Order)` by id in a
  `Database` session (reads not recorded, like the repository's own loads) with 1 and 8 tasks.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from sqlalchemy import select

from app.cache import CacheRepository, connect_redis
from app.embedded.redis import EmbeddedRedis
from app.orm import Database
from bench.common import Config, Env, Line, LoopMonitor, TailReader, execute, median, note, settle, spread
from bench.workers import (
    StreamConfig,
    app_worker_argv,
    commit_to_visible,
    create_topics,
    faust_worker,
    fmt_visible,
    round_broker,
    tracked,
)
from models import Order

SOURCE = "orders-v2"
PIPELINE = 100
#: A read variant: one call reads this many keys (an iterator of keys is its argument).
Reader = tuple[int, Callable[[Any], Awaitable[None]]]


async def _reads_per_s(read: Reader, keys: list[str], tasks: int, seconds: float) -> float:
    """Keys read per second by `tasks` tasks looping over `read` for `seconds`."""
    per_call, call = read
    done = 0

    async def loop(it: Any, until: float) -> None:
        nonlocal done
        while time.monotonic() < until:
            await call(it)
            done += per_call

    its = [itertools.cycle(keys[i::tasks] or keys) for i in range(tasks)]
    await asyncio.gather(*(loop(it, time.monotonic() + min(0.2, seconds)) for it in its))  # warm-up
    done = 0
    t0 = time.monotonic()
    await asyncio.gather(*(loop(it, t0 + seconds) for it in its))
    return done / (time.monotonic() - t0)


def _variants(repo: CacheRepository, raw: Redis, db: Database) -> dict[str, tuple[Reader, int]]:
    """name -> (reader, tasks)."""
    prefix = repo.key_of("orders", "")

    async def cached(it: Any) -> None:
        if await repo.get(Order, next(it)) is None:
            raise RuntimeError("a committed order read as absent")

    async def raw_get(it: Any) -> None:
        if await raw.get(prefix + next(it)) is None:
            raise RuntimeError("a cache key is missing")

    async def raw_pipelined(it: Any) -> None:
        async with raw.pipeline(transaction=False) as pipe:
            for _ in range(PIPELINE):
                pipe.get(prefix + next(it))
            values = await pipe.execute()
        if any(v is None for v in values):
            raise RuntimeError("a cache key is missing")

    async def db_read(it: Any) -> None:
        async with db.session() as s:
            if (await s.execute(select(Order).where(Order.id == int(next(it))))).scalar_one_or_none() is None:
                raise RuntimeError("a committed order is not in the database")

    return {
        "cached-1": ((1, cached), 1), "cached-8": ((1, cached), 8),
        "raw-1": ((1, raw_get), 1), "raw-8": ((1, raw_get), 8), "raw-pipelined": ((PIPELINE, raw_pipelined), 1),
        "db-1": ((1, db_read), 1), "db-8": ((1, db_read), 8),
    }


async def _wait_cached(raw: Redis, prefix: str, keys: list[str], timeout: float) -> int:
    """Wait until every key is in Redis; how many are missing at the end."""
    deadline = time.monotonic() + timeout
    while True:
        missing = 0
        for start in range(0, len(keys), 1000):
            values = await raw.mget([prefix + k for k in keys[start:start + 1000]])
            missing += sum(1 for v in values if v is None)
        if not missing or time.monotonic() > deadline:
            return missing
        await asyncio.sleep(0.1)


async def run(env: Env, cfg: Config) -> list[Line]:
    """Refresh lag with the worker running, then reads with it stopped."""
    scfg = StreamConfig.make(cfg.quick)
    run_dir = Path(tempfile.mkdtemp(prefix="mse-bench-cache-"))
    redis_server = EmbeddedRedis.start(run_dir / "redis")
    note(f"embedded Redis pid={redis_server.pid} on {redis_server.host}:{redis_server.port}")
    # The visibility poller checks every pending key at once: wait for a connection instead
    # of failing when the worker lags and hundreds are pending.
    raw = Redis(connection_pool=BlockingConnectionPool.from_url(redis_server.url, max_connections=32))
    db = Database(env.url, service="orders")
    lags: list[dict[str, Any]] = []
    keys: list[str] = []
    reads: dict[str, list[float]] = {}
    repo: CacheRepository | None = None
    ok = False
    try:
        with tracked(redis=redis_server.pid), round_broker(run_dir) as broker:
            await create_topics(broker.bootstrap, [SOURCE, "orders-v1", f"{SOURCE}.dlq"], env.settings.topic_partitions)
            await execute(env, "DELETE FROM outbox")  # the worker's relay must publish only our orders
            async with faust_worker("cache", app_worker_argv(), run_dir, DATABASE_URL=env.url,
                                    KAFKA_BROKER=broker.url, REDIS_URL=redis_server.url) as w:

                async def visible(key: str) -> bool:
                    return bool(await raw.exists(f"entity:orders:{key}"))

                async def lag_round(seconds: float) -> dict[str, Any]:
                    async with TailReader(broker.bootstrap, SOURCE) as tail:
                        with tracked(worker=w.pid), LoopMonitor() as monitor:
                            r = await commit_to_visible(db, tail, visible, scfg.lag_rate, seconds,
                                                        scfg.lag_sample_every, scfg.lag_poll_interval, timeout=60)
                    r["monitor"] = monitor
                    keys.extend(r["committed"])
                    return r

                await lag_round(0.3)  # warm-up; the group has joined once its orders are seen
                for r in range(scfg.cache_rounds):
                    await settle()
                    lags.append(await lag_round(scfg.lag_seconds))
                    note(f"cache round {r + 1}/{scfg.cache_rounds}: {fmt_visible(lags[-1])}; "
                         f"{lags[-1]['monitor'].summary()}")
                missing = await _wait_cached(raw, "entity:orders:", keys, timeout=60)
                if missing:
                    raise RuntimeError(f"{missing} of {len(keys)} committed orders never reached the cache")
            # The worker is stopped: reads measure the client side alone.
            repo = CacheRepository(connect_redis(redis_server.url),
                                   Database(env.url, service="orders", record_reads=False))
            read_db = Database(env.url, service="orders", record_reads=False)
            try:
                variants = _variants(repo, raw, read_db)
                names = list(variants)
                reads = {name: [] for name in names}
                for r in range(scfg.cache_rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    for name in order:
                        await settle()
                        read, tasks = variants[name]
                        with LoopMonitor() as monitor:
                            reads[name].append(await _reads_per_s(read, keys, tasks, scfg.read_seconds))
                        note(f"cache reads round {r + 1}/{scfg.cache_rounds} {name}: {reads[name][-1]:,.0f}/s; "
                             f"{monitor.summary()}")
                note(f"cache repository: {repo.stats}")
            finally:
                await read_db.close()
        ok = True
    finally:
        if repo is not None:
            await repo.redis.aclose()
            await repo.db.close()
        await raw.aclose()
        await db.close()
        with contextlib.suppress(Exception):
            await execute(env, "DELETE FROM outbox")
        redis_server.stop()
        note(f"stopped EmbeddedRedis pid={redis_server.pid}")
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            note(f"cache: logs kept in {run_dir}")
    for name, values in reads.items():
        note(f"cache reads {name}: {spread(values)}/s")
    if any(x["missing"] for x in lags):
        note(f"WARNING: sampled orders never seen in the cache: {[x['missing'] for x in lags]}")

    def lag(q: str) -> float:
        return median([x[q] for x in lags])

    def rd(name: str) -> float:
        return median(reads[name])

    rate = f"{scfg.lag_rate:.0f}/s"
    return [
        Line(f"commit -> cache refreshed p50 at {rate} (vs commit -> delivery on orders-v2)", lag("p50"),
             lag("delivery_p50"), "ms", "reference", fmt="{:.1f}"),
        Line(f"commit -> cache refreshed p99 at {rate} (vs commit -> delivery on orders-v2)", lag("p99"),
             lag("delivery_p99"), "ms", "<= 60 ms", lambda ours_, ratio: ours_ <= 60, fmt="{:.1f}"),
        Line("cached get/s, warm, 1 task (vs raw redis GET, 1 task)", rd("cached-1"), rd("raw-1"), "/s",
             "ratio >= 0.5", lambda ours_, ratio: ratio >= 0.5),
        Line("cached get/s, warm, 8 tasks (vs raw redis GET, 8 tasks)", rd("cached-8"), rd("raw-8"), "/s",
             "ratio >= 0.5", lambda ours_, ratio: ratio >= 0.5),
        Line(f"cached get/s, warm, 1 task (vs raw GET pipelined by {PIPELINE})", rd("cached-1"),
             rd("raw-pipelined"), "/s", "reference"),
        Line("cached get/s, warm, 1 task (vs database select by id, 1 task)", rd("cached-1"), rd("db-1"), "/s",
             "reference"),
        Line("cached get/s, warm, 8 tasks (vs database select by id, 8 tasks)", rd("cached-8"), rd("db-8"), "/s",
             "reference"),
    ]

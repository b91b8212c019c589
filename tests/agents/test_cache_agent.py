"""The worker's cache agent keeps Redis equal to the database, through restarts of Redis and of itself."""
from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import select, update

from agents.cache import Refresh, apply_all, refreshes
from app.cache import CacheRepository, connect_redis, decode_entry
from app.capture.roles import WORKER
from app.embedded.process import free_port
from app.embedded.redis import EmbeddedRedis
from app.orm import Database
from app.settings import Settings
from app.wire.messages import encode_message
from app.wire.schemas import load
from models import Order, OrderShipping
from tests.http import get_json, get_text
from tests.processes import start_worker, stop
from tests.waiting import until

#: Documented staleness bound of cached reads: the cache agent's lag behind the topic. The
#: commit -> refresh p99 is tens of ms on a quiet machine; this allows for a loaded CI box.
STALENESS_BOUND = 3.0


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Redis this module may restart (never the machine's shared one)."""
    server = EmbeddedRedis.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


#: How long the worker's agents may retry one batch before the worker reports them stuck.
STUCK_AFTER = 2.0


@dataclass
class CacheWorker:
    """The module's worker process, which a test may kill and start again."""

    settings: Settings
    log: Path
    env: dict[str, str]
    url: str
    child: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.child = await start_worker(self.settings, self.log, **self.env)

    def kill(self) -> None:
        assert self.child is not None
        stop(self.child, signal.SIGKILL)

    def poll(self) -> int | None:
        return None if self.child is None else self.child.poll()


@pytest.fixture(scope="module")
async def cache_worker(settings: Settings, schema: None, own_redis: EmbeddedRedis,
                       tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CacheWorker]:
    log = tmp_path_factory.mktemp("cache-worker") / "worker.log"
    port = free_port()
    # Static membership: restarted after SIGKILL, it takes its partitions back without waiting
    # out its dead self's session (about 10 s sooner on Tansu; see the README's Restart).
    worker = CacheWorker(settings, log, dict(APP_ID=f"mse-cache-{uuid.uuid4().hex[:8]}", WEB_PORT=str(port),
                                             REDIS_URL=own_redis.url, STUCK_AFTER_S=str(STUCK_AFTER),
                                             GROUP_INSTANCE_ID="cache-worker-0"),
                         f"http://127.0.0.1:{port}")
    await worker.start()
    yield worker
    if worker.child is not None:
        stop(worker.child)


@pytest.fixture
async def redis(own_redis: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


async def entry(redis: Redis, key: object) -> tuple[int, dict | None] | None:  # type: ignore[type-arg]
    raw = await redis.get(f"entity:orders:{key}")
    return None if raw is None else decode_entry(raw)


def test_refreshes_turn_events_into_cache_updates_and_skip_poison() -> None:
    v2 = load("orders", 2)
    record = {"event_id": str(uuid.uuid4()), "message_version": 1, "schema_version": 2, "service": "orders",
              "entity": "orders", "key": "7", "op": "delete", "occurred_at": datetime.now(timezone.utc),
              "sequence": 4, "data": None}
    value, _ = encode_message(v2, record)
    [only], poison = refreshes(v2, [b"\x00garbage", value, None])
    assert [i for i, _ in poison] == [0, 2]
    assert (only.entity, only.key, only.sequence, only.state) == ("orders", "7", 4, None)


async def test_events_refresh_and_tombstone_cache_entries(cache_worker: object, db: Database,
                                                          redis: Redis) -> None:
    async with db.session() as s:
        order = Order(customer_id=31, amount_cents=700, currency="EUR")
        order.shipping = OrderShipping(address="7 Cache Ln", carrier="DHL")
        s.add(order)
    await until(lambda: entry(redis, order.id), lambda e: e is not None and e[0] == 1, what="create cached")
    async with db.session() as s:
        (await s.get_one(Order, order.id)).status = "paid"
    got = await until(lambda: entry(redis, order.id), lambda e: e is not None and e[0] == 2, what="update")
    assert got[1] is not None and got[1]["status"] == "paid" and got[1]["shipping"]["address"] == "7 Cache Ln"
    async with db.session() as s:
        await s.delete(await s.get_one(Order, order.id))
    await until(lambda: entry(redis, order.id), lambda e: e == (3, None), what="tombstone")
    ttl = await redis.ttl(f"entity:orders:{order.id}")
    assert ttl > 0  # tombstones expire


async def test_writers_and_readers_converge_through_a_redis_restart(
        cache_worker: CacheWorker, db: Database, own_redis: EmbeddedRedis,
        settings: Settings) -> None:
    async with db.session() as s:
        orders = [Order(customer_id=32, amount_cents=i, currency="EUR") for i in range(100)]
        s.add_all(orders)
    ids = [o.id for o in orders]
    repo = CacheRepository(connect_redis(own_redis.url),
                           Database(settings.database_url_for(WORKER), service=WORKER, record_reads=False))
    rng = random.Random(5)
    stop_readers = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Every amount written is unique, so a read tells which commit it saw.
    amounts = iter(range(10**6, 10**7))
    committed: dict[int, list[tuple[float, int]]] = {o.id: [(loop.time(), o.amount_cents)] for o in orders}
    observed: list[tuple[float, int, int]] = []  # (read started, order, amount seen)

    async def writer(n: int) -> None:
        for _ in range(n):
            oid, amount = rng.choice(ids), next(amounts)
            async with db.session() as s:
                await s.execute(update(Order).where(Order.id == oid).values(amount_cents=amount))
            committed[oid].append((loop.time(), amount))

    async def reader() -> None:
        while not stop_readers.is_set():
            oid = rng.choice(ids)
            started = loop.time()
            state = await repo.get(Order, oid)
            assert state is not None  # never fails, Redis up or down
            observed.append((started, oid, state["amount_cents"]))
            await asyncio.sleep(0)

    readers = [asyncio.create_task(reader()) for _ in range(8)]
    await asyncio.gather(*(writer(40) for _ in range(8)))
    own_redis.restart()  # loses everything: misses reload from the database
    await asyncio.gather(*(writer(40) for _ in range(8)))
    stop_readers.set()
    await asyncio.gather(*readers)
    assert cache_worker.poll() is None and observed

    # Staleness of each read: how long before the read started the value it returned had
    # already been replaced by a committed write. The bound is the cache agent's lag.
    def staleness(started: float, oid: int, amount: int) -> float:
        history = committed[oid]
        index = next(i for i, (_, a) in enumerate(history) if a == amount)
        replaced = [t for t, _ in history[index + 1:] if t < started]
        return started - replaced[0] if replaced else 0.0

    worst = max(staleness(*read) for read in observed)
    assert worst <= STALENESS_BOUND, f"a read returned state {worst:.3f} s older than the newest commit"

    async with db.session() as s:
        rows = {o.id: o.amount_cents for o in (await s.execute(select(Order).where(Order.id.in_(ids)))).scalars()}

    redis = Redis.from_url(own_redis.url)  # a client made after the restart

    async def cached_equals_db() -> bool:
        for oid, cents in rows.items():
            e = await entry(redis, oid)
            if e is not None and (e[1] or {}).get("amount_cents") != cents:
                return False
        return True

    await until(cached_equals_db, timeout=60, what="every cached order equal to the database")
    fresh = await repo.get_many(Order, ids)
    assert {k: v["amount_cents"] for k, v in fresh.items() if v} == rows
    await repo.redis.aclose()
    await repo.db.close()
    await redis.aclose()



async def load_from_database(db: Database, ids: list[int]) -> dict[str, tuple[int, dict | None]]:  # type: ignore[type-arg]
    """key -> (sequence, state) as the database holds it (the query cache readers fill from)."""
    repo = CacheRepository(Redis.from_url("redis://unused"), db)
    try:
        return await repo._load(Order, [str(i) for i in ids])
    finally:
        await repo.redis.aclose()


async def cached(redis: Redis, ids: list[int]) -> dict[str, tuple[int, dict | None] | None]:  # type: ignore[type-arg]
    """key -> the cached (sequence, state), None where Redis has no entry."""
    raw = await redis.mget([f"entity:orders:{i}" for i in ids])
    return {str(i): None if r is None else decode_entry(r) for i, r in zip(ids, raw, strict=True)}


async def random_history(db: Database, rng: random.Random, orders: int, writes: int,
                         per_transaction: int = 10) -> tuple[list[int], list[Refresh]]:
    """Create `orders`, then `writes` random updates, deletes and re-creates; returns the ids and
    the refresh every committed change asks of the cache (its state as of the commit)."""
    async with db.session() as s:
        created = [Order(customer_id=40, amount_cents=i, currency="EUR") for i in range(orders)]
        s.add_all(created)
    ids = [o.id for o in created]
    alive = set(ids)
    history = [Refresh("orders", str(k), seq, state) for k, (seq, state) in (await load_from_database(db, ids)).items()]
    done = 0
    while done < writes:
        touched = rng.sample(ids, per_transaction)
        async with db.session() as s:
            for oid in touched:
                if oid in alive and rng.random() < 0.15:
                    await s.delete(await s.get_one(Order, oid))
                    alive.discard(oid)
                elif oid in alive:
                    (await s.get_one(Order, oid)).amount_cents = rng.randrange(10**6)
                else:  # re-created under the same key: its sequence keeps counting up
                    s.add(Order(id=oid, customer_id=40, amount_cents=rng.randrange(10**6), currency="EUR"))
                    alive.add(oid)
        history += [Refresh("orders", k, seq, state)
                    for k, (seq, state) in (await load_from_database(db, touched)).items()]
        done += per_transaction
    return ids, history


async def test_a_batch_of_1000_refreshes_in_one_call_leaves_redis_equal_to_the_database(
        db: Database, settings: Settings, tmp_path: Path) -> None:
    ids, history = await random_history(db, random.Random(12), orders=150, writes=850)
    batch = history[:]
    random.Random(13).shuffle(batch)  # order within a batch must not matter
    assert len(batch) >= 1000 and len({r.key for r in batch}) < len(batch)
    assert any(r.state is None for r in batch)  # tombstones among them
    # A Redis of its own: nothing else writes to it or calls scripts on it.
    server = EmbeddedRedis.start(tmp_path / "redis")
    # A client with redis-py's default pool (capped at 100 connections since redis-py 8): one
    # write per event, all at once, fails on it with "Too many connections".
    client = Redis.from_url(server.url)
    repo = CacheRepository(client, Database(settings.database_url_for(WORKER), service=WORKER, record_reads=False))
    try:
        calls = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
        await apply_all(repo, batch)
        after = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
        # One script call for the batch (a second one if Redis had to load the script first).
        assert after - calls <= 2, f"{after - calls} script calls for one batch"
        truth = await load_from_database(db, ids)
        assert await cached(client, ids) == truth
        assert repo.stats.refreshes_applied == len(ids)  # one write per key: its newest state
    finally:
        await client.aclose()
        await repo.db.close()
        server.stop()


async def ready(worker: CacheWorker) -> tuple[int, dict]:  # type: ignore[type-arg]
    return await get_json(worker.url + "/health/ready")


async def test_a_stage_retrying_one_batch_is_reported_stuck_and_recovers(
        cache_worker: CacheWorker, db: Database, own_redis: EmbeddedRedis) -> None:
    async with db.session() as s:
        orders = [Order(customer_id=41, amount_cents=i, currency="EUR") for i in range(20)]
        s.add_all(orders)
    ids = [o.id for o in orders]
    redis = Redis.from_url(own_redis.url)
    try:
        await until(lambda: cached(redis, ids), lambda c: all(e is not None for e in c.values()),
                    what="orders cached")
        await until(lambda: ready(cache_worker), lambda r: r[0] == 200, what="ready before the outage")
        start = cache_worker.log.stat().st_size
        own_redis.pause()  # SIGSTOP: every command times out
        try:
            async with db.session() as s:
                for o in await s.scalars(select(Order).where(Order.id.in_(ids))):
                    o.status = "paid"
            status, body = await until(lambda: ready(cache_worker), lambda r: r[0] == 503, timeout=30,
                                       what="not ready while the cache agent retries")
            [reason] = [r for r in body["reasons"] if "refresh_cache_orders" in r]
            assert "stuck" in reason and "retrying the same batch" in reason and "Timeout" in reason, reason
            _, status_doc = await get_json(cache_worker.url + "/status.json")
            assert status_doc["agents"]["refresh_cache_orders"]["state"] == "stuck"
            _, metrics = await get_text(cache_worker.url + "/metrics")
            assert 'mse_agent_stuck{agent="refresh_cache_orders"} 1.0' in metrics
            # Reported once per STUCK_AFTER, not at every retry.
            await until(lambda: cache_worker.log.read_text()[start:].count("retrying the same batch") >= 2,
                        timeout=STUCK_AFTER * 3, what="a second report")
        finally:
            own_redis.resume()
        await until(lambda: ready(cache_worker), lambda r: r[0] == 200, timeout=30, what="ready again")
        truth = await load_from_database(db, ids)
        await until(lambda: cached(redis, ids), lambda c: c == truth, what="cache equal to the database")
        log = cache_worker.log.read_text()[start:]
        assert log.count("retrying the same batch") <= log.count("is stuck") + 3, log[-3000:]
    finally:
        await redis.aclose()


async def test_a_worker_restarted_onto_a_backlog_converges_the_cache(
        cache_worker: CacheWorker, db: Database, own_redis: EmbeddedRedis) -> None:
    cache_worker.kill()  # SIGKILL: no goodbye to the group, nothing flushed
    ids, _ = await random_history(db, random.Random(14), orders=300, writes=3000, per_transaction=30)
    await cache_worker.start()
    redis = Redis.from_url(own_redis.url)
    try:
        truth = await load_from_database(db, ids)
        assert sum(seq for seq, _ in truth.values()) >= 3000  # the backlog: thousands of events
        await until(lambda: cached(redis, ids), lambda c: c == truth, timeout=60,
                    what="cache equal to the database after the backlog")
        assert "Too many connections" not in cache_worker.log.read_text()
    finally:
        await redis.aclose()

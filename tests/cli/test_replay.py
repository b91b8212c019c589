"""`python -m app replay`: the next worker rebuilds views and cache from the topics alone."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

from aiokafka import AIOKafkaProducer

from app.cache import connect_redis, decode_entry, encode_entry
from app.embedded.broker import EmbeddedBroker
from app.embedded.process import free_port
from app.embedded.redis import EmbeddedRedis
from app.orm import Database
from app.settings import Settings
from models import Order
from tests.agents.test_rocksdb_tables import fetch
from tests.kafka import TopicReader
from tests.processes import ROOT, app_env, start_worker, stop
from tests.waiting import until

FORGED_SEQUENCE = 10**9  # higher than any real sequence: no replayed event can overwrite it


def run_replay(settings: Settings, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", "replay"], cwd=ROOT, env=app_env(settings, **env),
                          capture_output=True, text=True, timeout=120)


async def forge_changelog_entry(settings: Settings, app_id: str, key: str, amount: int) -> None:
    """Write a wrong `orders` view entry with a huge sequence onto the changelog partition of `key`."""
    topic = f"{app_id}-orders-changelog"
    async with TopicReader(settings.bootstrap_servers, topic, decode=False) as reader:
        found = await reader.wait_for(lambda ms: any(m.key == key for m in ms), timeout=30)
    original = next(m for m in found if m.key == key)
    entry = json.loads(original.value)
    entry["seq"] = FORGED_SEQUENCE
    entry["state"]["amount_cents"] = amount
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(topic, json.dumps(entry).encode(), key=key.encode(),
                                     partition=original.partition)
    finally:
        await producer.stop()


async def test_replay_rebuilds_views_and_cache_that_went_wrong(db: Database, settings: Settings, schema: None,
                                                               tmp_path: Path) -> None:
    app_id = f"mse-replay-{uuid.uuid4().hex[:8]}"
    # A broker of its own: the worker reads every topic from offset 0, and the session's
    # topics hold every other test's events. (The worker's relay publishes this test's.)
    broker = EmbeddedBroker.start(tmp_path / "broker")
    settings = replace(settings, kafka_broker=broker.url)
    redis = EmbeddedRedis.start(tmp_path / "redis")
    port = free_port()
    env = {"APP_ID": app_id, "TABLE_STORE": "rocksdb://", "FAUST_DATA_DIR": str(tmp_path / "faust-data"),
           "RECOVERY_CONSISTENCY_CHECK": "0", "REDIS_URL": redis.url, "WEB_PORT": str(port)}
    view = f"http://127.0.0.1:{port}/table/orders/{{}}/"
    client = connect_redis(redis.url, timeout=5)
    try:
        async with db.session() as s:
            orders = [Order(customer_id=77, amount_cents=100 + i, currency="EUR") for i in range(20)]
            s.add_all(orders)
        worker = await start_worker(settings, tmp_path / "worker.log", **env)
        try:
            for o in orders:
                await until(lambda: asyncio.to_thread(fetch, view.format(o.id)), what=f"order {o.id} in the view",  # noqa: B023
                            timeout=60)
                await until(lambda: client.get(f"entity:orders:{o.id}"), what=f"order {o.id} cached")  # noqa: B023
            refused = run_replay(settings, env)
            assert refused.returncode == 1 and "stop every worker first" in refused.stderr, refused.stderr
        finally:
            stop(worker)

        # Break both derived stores with entries no replayed event can overwrite (huge sequences).
        victim = str(orders[0].id)
        await forge_changelog_entry(settings, app_id, victim, amount=-1)
        await client.set(f"entity:orders:{victim}", encode_entry(FORGED_SEQUENCE, {"amount_cents": -1}))

        done = run_replay(settings, env)
        assert done.returncode == 0, done.stderr
        assert f"consumer group {app_id}: deleted" in done.stdout
        assert "cached entities deleted: 20" in done.stdout
        assert await client.dbsize() == 0
        assert not list((tmp_path / "faust-data").rglob("orders*.db")), "the local table stores survived"
        assert f"{app_id}-orders-changelog" in done.stdout and f"{app_id}-customer_orders-updates" in done.stdout

        worker = await start_worker(settings, tmp_path / "worker.log", **env)
        try:
            for o in orders:
                entry = await until(lambda: asyncio.to_thread(fetch, view.format(o.id)),  # noqa: B023
                                    what=f"order {o.id} rebuilt", timeout=60)
                assert entry["state"]["amount_cents"] == o.amount_cents
                cached = await until(lambda: client.get(f"entity:orders:{o.id}"), what=f"order {o.id} re-cached")  # noqa: B023
                sequence, state = decode_entry(cached)  # type: ignore[misc]
                assert sequence < FORGED_SEQUENCE and state["amount_cents"] == o.amount_cents
            # The down-converter ran again from offset 0 too: orders-v1 holds a second copy of
            # each event, with the same id, which consumers drop as a duplicate.
            keys = {str(o.id) for o in orders}
            async with TopicReader(settings.bootstrap_servers, "orders-v1") as v1:
                await v1.wait_for(lambda ms: all(sum(m.key == k for m in ms) >= 2 for k in keys), timeout=60)
                copies = v1.for_keys(keys)
            ids: dict[str, list[str]] = {}
            for m in copies:
                ids.setdefault(m.key, []).append(m.record["event_id"])
            assert all(len(v) == 2 and len(set(v)) == 1 for v in ids.values()), ids
        finally:
            stop(worker)
    finally:
        await client.aclose()
        redis.stop()
        broker.stop()

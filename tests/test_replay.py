"""`python -m app replay` rebuilds the views and the cache from the topics."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from app.embedded import EmbeddedBroker, EmbeddedRedis, free_port
from app.orm import Database
from app.settings import Settings
from models import Order
from tests.processes import ROOT, app_env, start_worker, stop
from tests.waiting import until


def fetch(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError:
        return None  # not there yet (or not routable yet right after start)


async def test_replay_rebuilds_views_and_cache_from_the_topics(db: Database, settings: Settings, schema: None,
                                                               tmp_path: Path) -> None:
    # A broker of its own: the replay reads its topics from offset 0, and the session's
    # topics hold every other test's events.
    broker = EmbeddedBroker.start(tmp_path / "broker")
    settings = settings.with_(kafka_broker=broker.url)
    redis_server = EmbeddedRedis.start(tmp_path / "redis")
    env = {"APP_ID": f"mse-replay-{uuid.uuid4().hex[:8]}", "REDIS_URL": redis_server.url}
    redis = Redis.from_url(redis_server.url)
    try:
        port = free_port()
        worker = await start_worker(settings, tmp_path / "worker.log", WEB_PORT=str(port), **env)
        try:
            async with db.session() as s:
                orders = [Order(customer_id=51, amount_cents=10 + i, currency="EUR") for i in range(10)]
                s.add_all(orders)
            for o in orders:
                await until(lambda: asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/table/orders/{o.id}/"),  # noqa: B023
                            what=f"order {o.id} in the view", timeout=60)
            await until(lambda: redis.exists(*(f"entity:orders:{o.id}" for o in orders)),
                        lambda n: n == len(orders), what="orders cached")
        finally:
            stop(worker)

        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "app", "replay"], cwd=ROOT,
                                       env=app_env(settings, **env), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"deleted {env['APP_ID']}-orders-changelog" in done.stdout
        assert f"rewound group {env['APP_ID']} on orders-v2 to offset 0" in done.stdout
        assert await redis.exists(*(f"entity:orders:{o.id}" for o in orders)) == 0
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        await admin.start()
        try:
            assert f"{env['APP_ID']}-orders-changelog" not in await admin.list_topics()
        finally:
            await admin.close()

        port = free_port()
        worker = await start_worker(settings, tmp_path / "worker.log", WEB_PORT=str(port), **env)
        try:
            for o in orders:  # rebuilt from orders-v2, from offset 0
                value = await until(
                    lambda: asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/table/orders/{o.id}/"),  # noqa: B023
                    what=f"order {o.id} rebuilt", timeout=90)
                assert value["state"]["amount_cents"] == o.amount_cents
            await until(lambda: redis.exists(*(f"entity:orders:{o.id}" for o in orders)),
                        lambda n: n == len(orders), what="cache rebuilt", timeout=60)
        finally:
            stop(worker)
    finally:
        await redis.aclose()
        redis_server.stop()
        broker.stop()

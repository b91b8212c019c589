"""Views on RocksDB (`TABLE_STORE=rocksdb://`): written to disk and recovered after a restart."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.embedded import EmbeddedBroker, free_port
from app.orm import Database
from app.settings import Settings
from models import Order
from tests.processes import start_worker, stop
from tests.waiting import until


def fetch(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError:
        # Not there yet; right after start Faust's own route can even answer 500 while the
        # producer has no metadata of the changelog topic yet.
        return None


async def test_rocksdb_views_survive_a_worker_restart(db: Database, settings: Settings, schema: None,
                                                      tmp_path: Path) -> None:
    # A broker of its own: the worker reads from offset 0, and the session's topics hold
    # every other test's events. (The worker's relay publishes this test's.)
    broker = EmbeddedBroker.start(tmp_path / "broker")
    try:
        await views_survive_a_restart(db, replace(settings, kafka_broker=broker.url), tmp_path)
    finally:
        broker.stop()


async def views_survive_a_restart(db: Database, settings: Settings, tmp_path: Path) -> None:
    env = {"APP_ID": f"mse-rocks-{uuid.uuid4().hex[:8]}", "TABLE_STORE": "rocksdb://",
           "FAUST_DATA_DIR": str(tmp_path / "data"),
           # Tansu's wrong "latest offset" would make Faust's check refuse the stored tables.
           "RECOVERY_CONSISTENCY_CHECK": "0"}
    async with db.session() as s:
        orders = [Order(customer_id=41, amount_cents=100 + i, currency="EUR") for i in range(20)]
        s.add_all(orders)
    port = free_port()
    worker = await start_worker(settings, tmp_path / "worker.log", WEB_PORT=str(port), **env)
    try:
        for o in orders:
            await until(lambda: asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/table/orders/{o.id}/"),  # noqa: B023
                        what=f"order {o.id} in the view", timeout=60)
    finally:
        stop(worker)
    stores = list((tmp_path / "data").rglob("orders*.db"))
    assert stores, "no RocksDB store was written for the orders table"

    port = free_port()
    worker = await start_worker(settings, tmp_path / "worker.log", WEB_PORT=str(port), **env)
    try:
        for o in orders:
            value = await until(lambda: asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/table/orders/{o.id}/"),  # noqa: B023
                                what=f"order {o.id} after restart", timeout=60)
            assert value["state"]["amount_cents"] == o.amount_cents
    finally:
        stop(worker)

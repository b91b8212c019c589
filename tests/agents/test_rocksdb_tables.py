"""Views on RocksDB (`TABLE_STORE=rocksdb://`): written to disk and read back from it after a restart."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.embedded.broker import EmbeddedBroker
from app.embedded.process import free_port
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


async def test_rocksdb_views_are_served_from_the_local_store_after_a_restart(
        db: Database, settings: Settings, schema: None, tmp_path: Path) -> None:
    # A broker of its own: the worker reads from offset 0, and the session's topics hold
    # every other test's events. (The worker's relay publishes this test's.) The restart
    # gets a new, empty broker: no changelog and no events to rebuild from, so every value it
    # serves was read from the RocksDB files. (The memory store fails this test: it has
    # nothing to serve.)
    first = EmbeddedBroker.start(tmp_path / "broker")
    try:
        orders = await views_written(db, replace(settings, kafka_broker=first.url), tmp_path)
    finally:
        first.stop()
    second = EmbeddedBroker.start(tmp_path / "broker-2")
    try:
        await views_read_back(replace(settings, kafka_broker=second.url), tmp_path, orders)
    finally:
        second.stop()


def worker_env(tmp_path: Path) -> dict[str, str]:
    return {"APP_ID": "mse-rocks", "TABLE_STORE": "rocksdb://", "FAUST_DATA_DIR": str(tmp_path / "data"),
            # Tansu's wrong "latest offset" would make Faust's check refuse the stored tables.
            "RECOVERY_CONSISTENCY_CHECK": "0"}


async def views_written(db: Database, settings: Settings, tmp_path: Path) -> list[Order]:
    env = worker_env(tmp_path)
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
    return orders


async def views_read_back(settings: Settings, tmp_path: Path, orders: list[Order]) -> None:
    port = free_port()
    worker = await start_worker(settings, tmp_path / "worker.log", WEB_PORT=str(port), **worker_env(tmp_path))
    try:
        for o in orders:
            value = await until(lambda: asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/table/orders/{o.id}/"),  # noqa: B023
                                what=f"order {o.id} after restart", timeout=60)
            assert value["state"]["amount_cents"] == o.amount_cents
    finally:
        stop(worker)

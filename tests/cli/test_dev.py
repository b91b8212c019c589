"""`python -m app dev`: the supervisor of the dev stack, on this session's servers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from app.capture.roles import service_url
from app.cli.dev import wipe_state
from app.embedded.process import free_port
from app.orm import Database
from app.settings import Settings
from models import Order
from tests.http import get_json
from tests.processes import ROOT, app_env
from tests.waiting import until


async def test_a_worker_stopped_by_a_signal_ends_the_dev_stack_cleanly(settings: Settings, schema: None, redis_url: str,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "dev.out"
    env = app_env(settings, REDIS_URL=redis_url, APP_ID=f"mse-dev-{uuid.uuid4().hex[:8]}",
                  WEB_PORT=str(free_port()))
    with open(out, "wb") as sink:
        dev = subprocess.Popen([sys.executable, "-m", "app", "dev", "--data-dir", str(tmp_path / "run"),
                                "--for-seconds", "120"], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        banner = await until(lambda: out.read_text(), lambda text: re.search(r"worker\s+pid (\d+)", text) is not None,
                       timeout=60, what="the dev banner")
        worker = int(re.search(r"worker\s+pid (\d+)", banner).group(1))  # type: ignore[union-attr]
        os.kill(worker, signal.SIGTERM)  # as a signal to the process group would
        assert await until(dev.poll, lambda code: code is not None, timeout=60, what="the dev stack's exit") == 0
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    text = out.read_text()
    assert f"the worker (pid {worker})" in text and "stopping the dev stack" in text, text
    assert "Traceback" not in text, text


async def test_a_second_run_serves_the_first_runs_orders_and_billing_applies_nothing_twice(tmp_path: Path) -> None:
    """Run 1 (billing, no demo writer) gets orders written and invoiced; run 2 starts a new,
    empty broker on the kept database: the snapshot rebuilds the views and the cache, and
    billing's inbox skips every snapshot event as already applied."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "KAFKA_BROKER")}
    web, billing = free_port(), free_port()
    env.update(PYTHONPATH=str(ROOT), APP_ID=f"mse-dev-{uuid.uuid4().hex[:8]}", WEB_PORT=str(web),
               BILLING_WEB_PORT=str(billing))
    try:
        first = await _dev_run(env, tmp_path, 1, _write_and_invoice)
        second = await _dev_run(env, tmp_path, 2, _check_rebuilt)
    finally:
        wipe_state(tmp_path / "run")  # the embedded cluster may live outside tmp_path (as root)
    assert "snapshot of the database into the outbox: customers 0, invoices 0, orders 0" in first["out"]
    assert "snapshot of the database into the outbox: customers 0, invoices 5, orders 10\n" in second["out"]
    # Billing applied nothing in run 2: no invoice was written again (same sequences).
    assert second["invoices"] == first["invoices"] and len(first["invoices"]) == 5
    assert second["billing"]["applied"] == 0
    assert second["billing"]["skipped_old"] + second["billing"]["skipped_duplicate"] == 10
    assert second["orders"] == first["orders"]
    # The banner, printed once everything is ready, ends with the same `export` line both times
    # (the embedded servers keep their ports), and each run has its own logs.
    exports = [re.search(r"^export DATABASE_URL=\S+ KAFKA_BROKER=\S+ REDIS_URL=\S+$", run["out"], re.M)
               for run in (first, second)]
    assert exports[0] and exports[1] and exports[0].group(0) == exports[1].group(0), (first["out"], second["out"])
    assert (tmp_path / "run" / "worker.log.1").exists() and (tmp_path / "run" / "billing.log.1").exists()


async def _dev_run(env: dict[str, str], tmp_path: Path, run: int,
                   body: Callable[[str, dict[str, str]], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """One embedded dev run with billing and no demo writer; `body(database url, env)` runs while it is up."""
    out = tmp_path / f"dev-{run}.out"
    with open(out, "wb") as sink:
        dev = subprocess.Popen([sys.executable, "-m", "app", "dev", "--data-dir", str(tmp_path / "run"),
                                "--for-seconds", "600", "--demo", "--rate", "0"], cwd=ROOT, env=env, stdout=sink,
                               stderr=subprocess.STDOUT)
    try:
        text = await until(lambda: out.read_text(), lambda t: "Ctrl-C stops everything" in t, timeout=90,
                           what="the dev banner")
        url = re.search(r"PostgreSQL\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        result = await body(url, env)
    finally:
        dev.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            assert await until(dev.poll, lambda code: code is not None, timeout=60, what="dev stopped") == 0
        finally:
            if dev.poll() is None:  # never wipe under a running stack
                dev.kill()
                dev.wait()
    return {**result, "out": out.read_text()}


async def _state(url: str) -> dict[str, Any]:
    """The database's orders (id -> status) and invoices (order id -> its sequence)."""
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        orders = {str(r["id"]): r["status"] for r in await conn.fetch("SELECT id, status FROM orders")}
        invoices = {r["order_id"]: r["seq"] for r in await conn.fetch(
            "SELECT i.order_id, q.seq FROM invoices i JOIN event_sequences q "
            "ON q.entity = 'invoices' AND q.key = i.id::text")}
    finally:
        await conn.close()
    return {"orders": orders, "invoices": invoices}


async def _answer(url: str) -> tuple[int, Any]:
    """`get_json(url)`, or (0, None) while nothing listens there yet."""
    try:
        return await get_json(url)
    except aiohttp.ClientConnectionError:
        return 0, None


async def _billing_caught_up(env: dict[str, str], applied: int) -> dict[str, Any]:
    """Billing's status once it consumed `applied` events (applied or skipped) and has no lag."""
    url = f"http://127.0.0.1:{env['BILLING_WEB_PORT']}/status.json"

    def done(reply: tuple[int, Any]) -> bool:
        status, body = reply
        return status == 200 and body["lag"] == 0 and (
            body["applied"] + body["skipped_old"] + body["skipped_duplicate"] >= applied)

    return (await until(lambda: _answer(url), done, timeout=90, what="billing caught up"))[1]


async def _write_and_invoice(url: str, env: dict[str, str]) -> dict[str, Any]:
    """12 orders as the orders service; 6 paid; one paid and one pending deleted: 10 orders, 5 invoices."""
    db = Database(service_url(url, "mse_orders"), service="orders")
    try:
        async with db.session() as s:
            orders = [Order(customer_id=5, amount_cents=100 + i, currency="EUR") for i in range(12)]
            s.add_all(orders)
        async with db.session() as s:
            for order in orders[:6]:
                (await s.get_one(Order, order.id)).status = "paid"
        async with db.session() as s:
            for order in (orders[5], orders[11]):
                await s.delete(await s.get_one(Order, order.id))
    finally:
        await db.close()
    await _billing_caught_up(env, 12 + 6 + 2)  # creates, payments, deletes
    return await until(lambda: _state(url), lambda st: len(st["invoices"]) == 5, timeout=30, what="5 invoices")


async def _check_rebuilt(url: str, env: dict[str, str]) -> dict[str, Any]:
    """The views and the cache serve every kept order again; what billing did."""
    state = await _state(url)
    base = f"http://127.0.0.1:{env['WEB_PORT']}"
    for key, status in state["orders"].items():
        row = await until(lambda: _answer(f"{base}/tables/orders/{key}/"), lambda r: r[0] == 200, timeout=60,
                          what=f"order {key} in the orders table")
        assert row[1]["value"]["status"] == status
        cached = await until(lambda: _answer(f"{base}/entities/orders/{key}/"), lambda r: r[0] == 200, timeout=30,
                             what=f"order {key} through the cache")
        assert cached[1]["state"]["status"] == status
    paid = sum(1 for s in state["orders"].values() if s == "paid")
    await until(lambda: _answer(f"{base}/tables/orders_by_status/paid/"),
                lambda r: r[0] == 200 and r[1]["value"] == paid,
                timeout=30, what=f"orders_by_status[paid] = {paid}")
    return {**state, "billing": await _billing_caught_up(env, len(state["orders"]))}

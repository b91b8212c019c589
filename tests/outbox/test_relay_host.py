"""Where the worker runs its relay (RELAY_MODE): a supervised child process by default, or a thread."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from app.orm import Database
from app.outbox.relay_host import LoopRelay, ProcessRelay, ThreadRelay
from app.settings import Settings
from models import Order
from tests.kafka import TopicReader
from tests.processes import ROOT, app_env
from tests.waiting import until


async def write_orders(db: Database, n: int, customer_id: int) -> set[str]:
    async with db.session() as s:
        orders = [Order(customer_id=customer_id, amount_cents=100 + i, currency="EUR") for i in range(n)]
        s.add_all(orders)
    return {str(o.id) for o in orders}


async def seen(reader: TopicReader, keys: set[str]) -> set[str]:
    """The keys of `keys` not on the topic yet."""
    return keys - {m.key for m in reader.messages}


async def test_the_workers_relay_process_publishes_reports_and_is_started_again_after_a_crash(
        settings: Settings, db: Database) -> None:
    host = ProcessRelay(settings)
    await host.start()
    try:
        await until(lambda: host.stats.active, timeout=60, what="the relay process holds its shards")
        first_pid = host.pid
        async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
            keys = await write_orders(db, 20, customer_id=31001)
            await until(lambda: seen(reader, keys), lambda left: not left, timeout=30, what="orders on orders-v2")
            await until(lambda: host.stats.published, lambda n: n >= 20, what="published counted by the worker")
            assert host.stats.connected and host.stats.shards

            # A crash of the child: the worker starts another, counts the failure, keeps the totals.
            assert first_pid is not None
            psutil.Process(first_pid).send_signal(signal.SIGKILL)
            await until(lambda: host.stats.errors, lambda n: n >= 1, what="the crash counted")
            assert "exited with -9" in host.stats.last_error
            await until(lambda: host.pid not in (None, first_pid) and host.stats.active, timeout=60,
                        what="a new relay process holds the shards")
            more = await write_orders(db, 20, customer_id=31002)
            await until(lambda: seen(reader, more), lambda left: not left, timeout=30, what="later orders published")
            await until(lambda: host.stats.published, lambda n: n >= 40, what="totals carried over the restart")
        last_pid = host.pid
    finally:
        await host.stop()
    assert last_pid is not None and not psutil.pid_exists(last_pid), "the child is stopped with the worker"


async def test_a_supervised_relay_stops_when_its_worker_is_killed(settings: Settings, db: Database,
                                                                   tmp_path: Path) -> None:
    # A stand-in for the worker that holds the child's pipes as ProcessRelay does, and dies by SIGKILL.
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "child = subprocess.Popen([sys.executable, '-m', 'app', 'relay', '--supervised'], "
         "stdin=subprocess.PIPE, stdout=subprocess.PIPE)\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(600)\n"],
        cwd=ROOT, env=app_env(settings), stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        # It reports to its parent and publishes...
        async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
            keys = await write_orders(db, 5, customer_id=31003)
            await until(lambda: seen(reader, keys), lambda left: not left, timeout=60, what="orders published")
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        # ...and leaves with it: no relay outlives its worker.
        await until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=20,
                    what="the orphaned relay exits")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child.is_running():
            child.kill()


@pytest.mark.parametrize("host_type", [ThreadRelay, LoopRelay])
async def test_the_thread_and_loop_relays_publish_and_stop(settings: Settings, db: Database,
                                                           host_type: type[ThreadRelay | LoopRelay]) -> None:
    host = host_type(settings)
    await host.start()
    try:
        await until(lambda: host.stats.active, timeout=30, what="the relay holds its shards")
        async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
            keys = await write_orders(db, 10, customer_id=31004)
            await until(lambda: seen(reader, keys), lambda left: not left, timeout=30, what="orders published")
    finally:
        await host.stop()
    assert not host.stats.connected

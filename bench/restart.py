"""Restart after SIGKILL: how long a killed worker takes to be ready again, with dynamic and
static group membership (`GROUP_INSTANCE_ID`).

Per round: a worker (`python -m app worker`, a group of its own, the benchmark's PostgreSQL,
an embedded Redis and a fresh Tansu) is started and made ready; it is SIGKILLed and started
again at once; the time from the new process's spawn to `/health/ready` answering 200 is the
figure. The raw baseline is the same restart of a bare aiokafka consumer in the same group
mode: spawn -> partitions assigned, the part of the restart that is the broker's group protocol.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from app.embedded.process import free_port
from app.embedded.redis import EmbeddedRedis
from bench.common import Config, Env, Line, median, note, spread
from bench.workers import Child, app_worker_argv, child_env, create_topics, round_broker, spawn, stop_child

ROUNDS = {True: 2, False: 3}  # quick / full

#: A bare aiokafka consumer that prints "assigned" once the group gave it partitions.
RAW_CONSUMER = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
bootstrap, topic, group, instance = sys.argv[1:5]
class Listener(ConsumerRebalanceListener):
    async def on_partitions_revoked(self, revoked): pass
    async def on_partitions_assigned(self, assigned):
        if assigned: print("assigned", flush=True)
async def main():
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, group_instance_id=instance or None,
                         session_timeout_ms=10000, heartbeat_interval_ms=1000, rebalance_timeout_ms=5000)
    c.subscribe([topic], listener=Listener())
    await c.start()
    while True:
        await c.getmany(timeout_ms=200)
asyncio.run(main())
"""


async def ready_after(child: Child, started: float, timeout: float = 120.0) -> float:
    """Seconds from `started` until the child's `/health/ready` answers 200."""
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < timeout:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            try:
                async with session.get(child.url + "/health/ready",
                                       timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{child.name} not ready in {timeout:.0f} s:\n{child.tail()}")


async def worker_restart(env: Env, run_dir: Path, redis_url: str, kafka: str, static: bool) -> float:
    """One round: start, ready, SIGKILL, start again; seconds from the second spawn to ready."""
    app_id = f"mse-bench-restart-{uuid.uuid4().hex[:8]}"
    port = free_port()
    extra = dict(APP_ID=app_id, WEB_PORT=str(port), DATABASE_URL=env.url, KAFKA_BROKER=kafka, REDIS_URL=redis_url,
                 FAUST_DATA_DIR=str(run_dir / f"{app_id}-data"))
    if static:
        extra["GROUP_INSTANCE_ID"] = "worker-0"
    first = spawn("worker", app_worker_argv(), run_dir / f"{app_id}-1.log", child_env(**extra), port)
    try:
        await ready_after(first, time.monotonic())
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    started = time.monotonic()
    second = spawn("worker", app_worker_argv(), run_dir / f"{app_id}-2.log", child_env(**extra), port)
    try:
        return await ready_after(second, started)
    finally:
        await asyncio.to_thread(stop_child, second)


async def raw_restart(run_dir: Path, bootstrap: str, topic: str, static: bool) -> float:
    """The baseline round: a bare consumer assigned, SIGKILLed, started again; seconds to assigned."""
    group = f"raw-restart-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-c", RAW_CONSUMER, bootstrap, topic, group, "raw-0" if static else ""]

    async def assigned(child: Child, started: float) -> float:
        while b"assigned" not in child.log.read_bytes():
            if child.proc.poll() is not None or time.monotonic() - started > 120:
                raise RuntimeError(f"raw consumer never assigned:\n{child.tail()}")
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    first = spawn("raw", argv, run_dir / f"{group}-1.log", child_env())
    try:
        await assigned(first, time.monotonic())
    finally:
        first.proc.kill()
        first.proc.wait()
    started = time.monotonic()
    second = spawn("raw", argv, run_dir / f"{group}-2.log", child_env())
    try:
        return await assigned(second, started)
    finally:
        await asyncio.to_thread(stop_child, second)


async def run(env: Env, cfg: Config) -> list[Line]:
    """Restart-to-ready of the worker and of a bare consumer, dynamic and static membership."""
    run_dir = Path(tempfile.mkdtemp(prefix="mse-bench-restart-"))
    redis_server = EmbeddedRedis.start(run_dir / "redis")
    results: dict[tuple[str, bool], list[float]] = {}
    try:
        for _ in range(ROUNDS[cfg.quick]):
            for static in (False, True):
                with round_broker(run_dir) as broker:
                    await create_topics(broker.bootstrap, ["raw-restart"], 4)
                    raw = await raw_restart(run_dir, broker.bootstrap, "raw-restart", static)
                    ours = await worker_restart(env, run_dir, redis_server.url, broker.url, static)
                results.setdefault(("raw", static), []).append(raw)
                results.setdefault(("ours", static), []).append(ours)
                note(f"restart ({'static' if static else 'dynamic'}): worker {ours:.1f} s, raw consumer {raw:.1f} s")
    finally:
        redis_server.stop()
    for (what, static), values in sorted(results.items()):
        note(f"restart {what} {'static' if static else 'dynamic'}: {spread(values, '{:.1f}')} s")

    def med(what: str, static: bool) -> float:
        return median(results[(what, static)])

    return [
        Line("restart after SIGKILL -> ready, dynamic membership (vs bare consumer -> assigned)",
             med("ours", False), med("raw", False), "s", "reference", fmt="{:.1f}"),
        Line("restart after SIGKILL -> ready, GROUP_INSTANCE_ID set (vs bare consumer, static)",
             med("ours", True), med("raw", True), "s", "<= 10 s", lambda ours, ratio: ours <= 10, fmt="{:.1f}"),
    ]

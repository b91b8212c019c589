"""Commit -> delivery latency on `orders-v2` at a fixed rate, vs raw aiokafka produce -> consume.

Ours: an in-process `Relay` publishes; a writer commits one new Order every 1/rate seconds
(open loop: each commit starts on schedule as its own task, so a slow commit never delays
the next), the commit time is taken right after the session block exits, and a consumer
assigned to every partition (from the end, `fetch_max_wait_ms=5`) notes the first receive
time of each key. Baseline: an `AIOKafkaProducer` configured like the relay's sends a message
of the same size and headers at the same rate to a fresh topic; send-call time -> receive time.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer

from app.orm import Database
from app.outbox.relay import Relay
from bench.common import (
    Config,
    Env,
    Line,
    LoopMonitor,
    TailReader,
    create_topic,
    median,
    note,
    paced,
    percentile,
    sample_message,
    settle,
)
from models import Order

TOPIC = "orders-v2"


async def _relay_round(env: Env, db: Database, relay: Relay, rate: float, seconds: float) -> dict[str, Any]:
    commit_at: dict[str, float] = {}

    async def fire(i: int) -> None:
        async with db.session() as s:
            order = Order(customer_id=i % 1000, amount_cents=1999, currency="EUR")
            s.add(order)
        commit_at[str(order.id)] = time.monotonic()

    batches0, published0 = relay.stats.batches, relay.stats.published
    async with TailReader(env.bootstrap, TOPIC) as reader:
        with LoopMonitor() as monitor:
            n, took = await paced(rate, seconds, fire)
        missing = await reader.wait_for_keys(set(commit_at), timeout=20)
    lat = [(reader.received[k] - t) * 1000 for k, t in commit_at.items() if k in reader.received]
    batches = relay.stats.batches - batches0
    rows = relay.stats.published - published0
    return {"n": n, "rate": n / took, "missing": len(missing), "p50": percentile(lat, 50),
            "p99": percentile(lat, 99), "max": max(lat, default=float("nan")),
            "rows_per_batch": rows / batches if batches else float("nan"), "monitor": monitor}


async def _raw_round(env: Env, producer: AIOKafkaProducer, rate: float, seconds: float) -> dict[str, Any]:
    topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
    await create_topic(env, topic)
    msg = sample_message()
    send_at: dict[str, float] = {}

    async def fire(i: int) -> None:
        key = str(i)
        send_at[key] = time.monotonic()
        ack = await producer.send(topic, msg.value, key=key.encode(), headers=msg.headers)
        await ack

    async with TailReader(env.bootstrap, topic) as reader:
        with LoopMonitor() as monitor:
            n, took = await paced(rate, seconds, fire)
        missing = await reader.wait_for_keys(set(send_at), timeout=20)
    lat = [(reader.received[k] - t) * 1000 for k, t in send_at.items() if k in reader.received]
    return {"n": n, "rate": n / took, "missing": len(missing), "p50": percentile(lat, 50),
            "p99": percentile(lat, 99), "max": max(lat, default=float("nan")), "monitor": monitor}


def _fmt(r: dict[str, Any]) -> str:
    extra = f", {r['rows_per_batch']:.1f} rows/batch" if "rows_per_batch" in r else ""
    return (f"{r['n']:.0f} msgs at {r['rate']:.0f}/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, "
            f"max {r['max']:.1f} ms, missing {r['missing']:.0f}{extra}; {r['monitor'].summary()}")


async def run(env: Env, cfg: Config) -> list[Line]:
    db = Database(env.url, service="orders")
    relay = Relay(env.settings)
    relay_task = asyncio.get_running_loop().create_task(relay.run(), name="relay")
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all", linger_ms=0,
                                max_batch_size=1 << 20, request_timeout_ms=15000, retry_backoff_ms=100)
    await producer.start()
    ours: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 30
        while not relay.stats.active:  # the relay creates its topics on start
            if relay_task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"relay did not become active: {relay.stats.error}")
            await asyncio.sleep(0.02)
        # Warm-up (not counted): pools, statement caches, topic metadata.
        await _relay_round(env, db, relay, cfg.latency_rate, 0.5)
        await _raw_round(env, producer, cfg.latency_rate, 0.5)
        for r in range(cfg.latency_rounds):
            await settle()
            ours.append(await _relay_round(env, db, relay, cfg.latency_rate, cfg.latency_seconds))
            note(f"latency round {r + 1}/{cfg.latency_rounds} relay: {_fmt(ours[-1])}")
            await settle()
            raw.append(await _raw_round(env, producer, cfg.latency_rate, cfg.latency_seconds))
            note(f"latency round {r + 1}/{cfg.latency_rounds} raw:   {_fmt(raw[-1])}")
    finally:
        await producer.stop()
        relay.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(relay_task, 20)
        await db.close()
    if any(r["missing"] for r in ours):
        note(f"WARNING: relay rounds lost messages: {[r['missing'] for r in ours]}")
    rate = f"{cfg.latency_rate:.0f}/s"
    return [
        Line(f"commit -> delivery p50 at {rate} (vs raw produce -> consume)",
             median([r["p50"] for r in ours]), median([r["p50"] for r in raw]), "ms", "<= 10 ms",
             lambda ours_, ratio: ours_ <= 10, fmt="{:.1f}"),
        Line(f"commit -> delivery p99 at {rate} (vs raw produce -> consume)",
             median([r["p99"] for r in ours]), median([r["p99"] for r in raw]), "ms", "<= 40 ms",
             lambda ours_, ratio: ours_ <= 40, fmt="{:.1f}"),
    ]

"""Down-converter messages/s on a pre-filled `orders-v2`, vs a naive Faust forwarder and a raw copy loop.

Each round starts a fresh, empty broker and pre-fills `orders-v2` with N valid v2 events.
Why a broker per round rather than a fresh consumer group on a shared one: the worker's topic
names are fixed (`orders-v2` in, `orders-v1` out), so on a shared broker every round would find
the previous rounds' outputs, consumer groups, changelog and repartition topics still there
and the later rounds would run on a fuller broker than the first. With a broker per round every
variant of the round reads the same N messages from offset 0 with a consumer group of its own,
on the same broker, and no round inherits anything from another.

Variants, in rotating order within a round, each a child process:
- ours: `python -m app worker` (`-l info`, default legacy modes: orders v1 = downconvert). It
  runs everything our worker runs (views on the same topic, relay, web), as deployed.
- agent alone: `bench.faust_apps:downconvert_only`, our down-conversion agent without the rest.
- naive: `bench.faust_apps:naive`, `async for value in stream: await out.send(value=value)`.
- raw: `bench.raw_baselines copy`, an aiokafka consume -> produce loop (the limit).
A consumer assigned to every partition of the output topic times each from its first output
message to its N-th, so start-up and the group join are excluded.
"""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from app.embedded.broker import EmbeddedBroker
from bench.common import Config, Env, Line, LoopMonitor, execute, median, note, process_cpu, settle, spread
from bench.workers import (
    SHARED,
    Child,
    CountReader,
    Prepared,
    StreamConfig,
    app_worker_argv,
    bench_app_argv,
    child_env,
    create_topics,
    faust_worker,
    prefill,
    round_broker,
    spawn,
    stop_child,
    tracked,
    v2_events,
    wait_event,
)

SOURCE = "orders-v2"
TARGET = "orders-v1"
VARIANTS = ("ours", "agent", "naive", "raw")


async def _timed(reader: CountReader, child: Child, timeout: float = 900.0) -> dict[str, Any]:
    """Wait for the first output, then time until the n-th (with a LoopMonitor over that span)."""
    await wait_event(reader.first, 120, child, f"a first message on {reader.topic}")
    cpu0 = process_cpu(child.pid)
    with tracked(**{child.name: child.pid}), LoopMonitor() as monitor:
        await wait_event(reader.done, timeout, child, f"{reader.n} messages on {reader.topic}")
        cpu = process_cpu(child.pid) - cpu0
    await asyncio.sleep(0.3)  # anything beyond n (duplicates) would show now
    return {"rate": reader.rate, "seconds": (reader.done_at or 0) - (reader.first_at or 0),
            "extra": reader.count - reader.n, "cpu_us": cpu / max(reader.n - 1, 1) * 1e6, "monitor": monitor}


async def _ours(env: Env, broker: EmbeddedBroker, run_dir: Path, n: int) -> dict[str, Any]:
    """Our worker: `orders-v2` -> `orders-v1`."""
    await execute(env, "DELETE FROM outbox")  # the worker's relay must publish nothing of its own
    async with CountReader(broker.bootstrap, TARGET, n, from_end=True) as reader, \
            faust_worker("ours", app_worker_argv(), run_dir, DATABASE_URL=env.url, KAFKA_BROKER=broker.url) as w:
        return await _timed(reader, w)


async def _agent(env: Env, broker: EmbeddedBroker, run_dir: Path, n: int) -> dict[str, Any]:
    """Our down-conversion agent alone: `orders-v2` -> `orders-v1`."""
    async with CountReader(broker.bootstrap, TARGET, n, from_end=True) as reader, \
            faust_worker("agent", bench_app_argv("downconvert_only"), run_dir, KAFKA_BROKER=broker.url) as w:
        return await _timed(reader, w)


async def _naive(env: Env, broker: EmbeddedBroker, run_dir: Path, n: int) -> dict[str, Any]:
    """The naive Faust forwarder: `orders-v2` -> a fresh topic."""
    out = f"bench-naive-{uuid.uuid4().hex[:8]}"
    await create_topics(broker.bootstrap, [out], env.settings.topic_partitions)
    async with CountReader(broker.bootstrap, out, n) as reader, \
            faust_worker("naive", bench_app_argv("naive"), run_dir, KAFKA_BROKER=broker.url,
                         BENCH_SOURCE=SOURCE, BENCH_OUT=out) as w:
        return await _timed(reader, w)


async def _raw(env: Env, broker: EmbeddedBroker, run_dir: Path, n: int) -> dict[str, Any]:
    """The raw aiokafka copy loop: `orders-v2` -> a fresh topic."""
    out = f"bench-copy-{uuid.uuid4().hex[:8]}"
    await create_topics(broker.bootstrap, [out], env.settings.topic_partitions)
    async with CountReader(broker.bootstrap, out, n) as reader:
        child = spawn("raw", [sys.executable, "-m", "bench.raw_baselines", "copy", broker.bootstrap, SOURCE, out,
                              str(n), "--fetch-wait-ms", str(env.settings.consumer_fetch_max_wait_ms)],
                      run_dir / f"{out}.log", child_env())
        try:
            return await _timed(reader, child)
        finally:
            await asyncio.to_thread(stop_child, child)


RUNNERS: dict[str, Callable[[Env, EmbeddedBroker, Path, int], Awaitable[dict[str, Any]]]] = {
    "ours": _ours, "agent": _agent, "naive": _naive, "raw": _raw}


def _fmt(r: dict[str, Any], n: int) -> str:
    """One progress line of a variant's round."""
    return (f"{n:,} in {r['seconds']:.2f} s = {r['rate']:,.0f}/s ({r['extra']} beyond N), "
            f"{r['cpu_us']:.0f} µs of its CPU per message; "
            f"{r['monitor'].summary()}")


async def run(env: Env, cfg: Config) -> list[Line]:
    """Rounds of the four variants, each round on a fresh broker."""
    scfg = StreamConfig.make(cfg.quick)
    n = scfg.downconvert_events
    events: Prepared = v2_events(n)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    run_dir = Path(tempfile.mkdtemp(prefix="mse-bench-downconvert-"))
    keep_logs = True
    try:
        for r in range(scfg.downconvert_rounds):
            with round_broker(run_dir) as broker:
                await create_topics(broker.bootstrap, [SOURCE, TARGET, f"{SOURCE}.dlq"], env.settings.topic_partitions)
                took = await prefill(broker.bootstrap, SOURCE, events)
                note(f"downconvert round {r + 1}/{scfg.downconvert_rounds}: broker pid={broker.pid}, "
                     f"{n:,} events pre-filled in {took:.2f} s")
                order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
                for variant in order:
                    await settle()
                    t0 = time.monotonic()
                    res = await RUNNERS[variant](env, broker, run_dir, n)
                    results[variant].append(res)
                    note(f"downconvert round {r + 1} {variant}: {_fmt(res, n)} "
                         f"(variant took {time.monotonic() - t0:.1f} s in all)")
        # Duplicates (messages beyond N) mean a rebalance or a retry: keep the logs to see which.
        keep_logs = any(x["extra"] for xs in results.values() for x in xs)
    finally:
        with contextlib.suppress(Exception):
            await execute(env, "DELETE FROM outbox")
        if keep_logs:
            note(f"downconvert: logs kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    rates = {v: [x["rate"] for x in results[v]] for v in VARIANTS}
    for v in VARIANTS:
        note(f"downconvert {v}: {spread(rates[v])} msgs/s, "
             f"{median([x['cpu_us'] for x in results[v]]):.0f} µs of its CPU per message")
    SHARED.update({f"{v}_rate": median(rates[v]) for v in ("naive", "raw")})
    cpu = {v: median([x["cpu_us"] for x in results[v]]) for v in VARIANTS}
    label = f"{n:,} pre-filled"
    return [
        Line(f"down-converter msgs/s, worker, {label} (vs naive Faust forwarder)", median(rates["ours"]),
             median(rates["naive"]), "/s", "ratio >= 1.2", lambda ours_, ratio: ratio >= 1.2),
        Line(f"down-converter msgs/s, worker, {label} (vs raw aiokafka copy loop)", median(rates["ours"]),
             median(rates["raw"]), "/s", "reference"),
        Line(f"down-converter msgs/s, agent alone, {label} (vs naive Faust forwarder)", median(rates["agent"]),
             median(rates["naive"]), "/s", "reference"),
        Line("process CPU per message, worker (vs naive Faust forwarder)", cpu["ours"], cpu["naive"], "µs",
             "reference"),
        Line("process CPU per message, agent alone (vs naive Faust forwarder)", cpu["agent"], cpu["naive"], "µs",
             "reference"),
    ]

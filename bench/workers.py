"""Pieces of the stream benchmarks: child processes (Faust workers, raw baselines), a broker per
round, pre-filled topics, output counters and the commit -> visible measurement.

Every child process is started here and stopped by its PID (SIGTERM, then SIGKILL after 5 s:
a Faust worker stopped with a backlog in its stream buffers waits for them to drain first).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.embedded.broker import EmbeddedBroker
from app.embedded.process import free_port
from app.embedded.redis import EmbeddedRedis
from app.orm import Database
from app.wire.messages import encode_message
from app.wire.schemas import load
from bench.common import SERVER_PIDS, Env, TailReader, execute, note, paced, percentile
from models import Order
from models.order import STATUSES

ROOT = Path(__file__).resolve().parent.parent
#: Settings a child must not inherit from the benchmark's own environment.
_CHILD_ENV_DROP = ("DATABASE_URL", "REDIS_URL", "KAFKA_BROKER", "APP_ID", "WEB_PORT", "WEB_HOST", "LEGACY_MODES",
                   "CONSUMER_FETCH_MAX_WAIT_MS", "TABLE_STORE", "SERVICE_NAME")
#: Keys of pre-filled events start here, far above the ids PostgreSQL hands out to committed orders.
PREFILL_KEY_BASE = 1_000_000_000_000
#: Medians one benchmark measured that a later one of the same run compares with (name -> value).
SHARED: dict[str, float] = {}


@dataclass
class StreamConfig:
    """Sizes and round counts of the stream benchmarks; `--quick` shrinks them."""

    quick: bool = False
    downconvert_rounds: int = 3
    downconvert_events: int = 30_000
    views_rounds: int = 3
    views_events: int = 20_000
    lag_rate: float = 500.0
    lag_seconds: float = 5.0
    lag_sample_every: int = 10
    lag_poll_interval: float = 0.002
    idle_seconds: float = 10.0
    lookup_seconds: float = 3.0
    lookup_clients: int = 8
    cache_rounds: int = 3
    read_seconds: float = 1.0

    @classmethod
    def make(cls, quick: bool) -> "StreamConfig":
        """The full configuration, or the quick one."""
        if not quick:
            return cls()
        return cls(quick=True, downconvert_rounds=1, downconvert_events=3_000, views_rounds=1, views_events=2_000,
                   lag_seconds=1.0, idle_seconds=2.0, lookup_seconds=1.0, cache_rounds=1, read_seconds=0.5)


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------


@dataclass
class Child:
    """A child process of the benchmark, with its log and (for servers) its web port."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def pid(self) -> int:
        """PID of the child."""
        return self.proc.pid

    @property
    def url(self) -> str:
        """Base URL of its web server."""
        return f"http://127.0.0.1:{self.port}"

    def tail(self, lines: int = 40) -> str:
        """The last lines of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: ours minus the app's settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str], port: int | None = None) -> Child:
    """Start a child process writing to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    return Child(name, proc, log, port)


def stop_child(child: Child, timeout: float = 5.0) -> None:
    """SIGTERM the child by PID, SIGKILL it after `timeout` s, and reap it."""
    proc = child.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            note(f"{child.name} pid={child.pid} ignored SIGTERM for {timeout:.0f} s: SIGKILL")
            proc.kill()
            proc.wait()


async def wait_for_log(child: Child, text: str, timeout: float) -> None:
    """Wait until `text` is in the child's log; fail early if it exited."""
    deadline = time.monotonic() + timeout
    needle = text.encode()
    while True:
        if needle in child.log.read_bytes():
            return
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode} before {text!r}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name}: no {text!r} after {timeout:.0f} s:\n{child.tail()}")
        await asyncio.sleep(0.05)


def app_worker_argv() -> list[str]:
    """Our worker, as operators run it."""
    return [sys.executable, "-m", "app", "worker"]


def bench_app_argv(attr: str) -> list[str]:
    """A Faust app of `bench.faust_apps`, run like our worker (`-l info`)."""
    return [sys.executable, "-m", "faust", "-A", f"bench.faust_apps:{attr}", "worker", "-l", "info"]


@contextlib.asynccontextmanager
async def faust_worker(name: str, argv: list[str], run_dir: Path, **env: str) -> AsyncIterator[Child]:
    """A Faust worker child, yielded once it logged `[^Worker]: Ready`; stopped by PID on exit."""
    port = free_port()
    app_id = env.pop("APP_ID", f"mse-bench-{name}-{uuid.uuid4().hex[:8]}")
    # Faust's data dir (table stores) in the round's directory, not `<app id>-data` in the cwd.
    env.setdefault("FAUST_DATA_DIR", str(run_dir / f"{app_id}-data"))
    child = spawn(name, argv, run_dir / f"{app_id}.log",
                  child_env(APP_ID=app_id, WEB_PORT=str(port), WEB_HOST="127.0.0.1", **env), port)
    t0 = time.monotonic()
    try:
        await wait_for_log(child, "[^Worker]: Ready", timeout=120)
        note(f"{name} worker pid={child.pid} ready in {time.monotonic() - t0:.1f} s (app id {app_id})")
        yield child
    finally:
        t1 = time.monotonic()
        await asyncio.to_thread(stop_child, child)
        note(f"stopped {name} worker pid={child.pid} in {time.monotonic() - t1:.1f} s")


@contextlib.contextmanager
def tracked(**pids: int) -> Iterator[None]:
    """Count these processes in the CPU breakdown of `LoopMonitor`s entered inside the block."""
    SERVER_PIDS.update(pids)
    try:
        yield
    finally:
        for name in pids:
            SERVER_PIDS.pop(name, None)


@contextlib.asynccontextmanager
async def run_with_redis(env: Env, name: str) -> AsyncIterator[tuple[Path, EmbeddedRedis]]:
    """A run directory and an embedded Redis in it, for a benchmark whose workers keep a cache.

    On the way out Redis is stopped by PID and the outbox emptied; the directory (logs) is
    removed after a success and kept, and named, after a failure.
    """
    run_dir = Path(tempfile.mkdtemp(prefix=f"mse-bench-{name}-"))
    redis_server = EmbeddedRedis.start(run_dir / "redis")
    ok = False
    try:
        with tracked(redis=redis_server.pid):
            yield run_dir, redis_server
        ok = True
    finally:
        redis_server.stop()
        with contextlib.suppress(Exception):
            await execute(env, "DELETE FROM outbox")
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            note(f"{name}: logs kept in {run_dir}")


@contextlib.contextmanager
def round_broker(run_dir: Path) -> Iterator[EmbeddedBroker]:
    """A fresh, empty, memory-only Tansu broker; stopped by PID on exit."""
    broker = EmbeddedBroker.start(run_dir / f"broker-{uuid.uuid4().hex[:8]}")
    try:
        with tracked(**{"tansu (round)": broker.pid}):
            yield broker
    finally:
        broker.stop()


async def topic_sizes(broker_url: str, app_id: str, *, own_only: bool = False) -> dict[str, int]:
    """Messages in each topic: the event topics and the worker's own (changelogs, repartition;
    named without the `<app id>-` prefix), or, `own_only`, the worker's alone."""
    from app.cli.topics import topic_list
    from app.settings import Settings

    listed = await topic_list(Settings(kafka_broker=broker_url), internal=True)
    return {t.topic.removeprefix(f"{app_id}-"): t.messages for t in listed
            if not t.topic.endswith(("__assignor-__leader", ".dlq"))
            and (t.topic.startswith(f"{app_id}-") or not own_only)}


async def create_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    """Create topics (all with `partitions` partitions) on the broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    finally:
        await admin.close()


# --------------------------------------------------------------------------------------------
# Pre-filled topics and output counters
# --------------------------------------------------------------------------------------------

Prepared = list[tuple[bytes, bytes, list[tuple[str, bytes]]]]


def v2_events(n: int, now: datetime | None = None) -> Prepared:
    """(key, value, headers) of `n` valid `orders-v2` create events with distinct keys, created `now`."""
    schema = load("orders", 2)
    now = now or datetime.now(timezone.utc)
    micros = int(now.timestamp() * 1_000_000)
    out: Prepared = []
    for i in range(n):
        key = str(PREFILL_KEY_BASE + i)
        record = {
            "event_id": str(uuid.uuid4()), "message_version": 1, "schema_version": 2, "service": "orders",
            "entity": "orders", "key": key, "op": "create", "occurred_at": now, "sequence": 1,
            "data": {"id": int(key), "customer_id": i % 1000, "amount_cents": 100 + i % 9000, "currency": "EUR",
                     "status": STATUSES[i % len(STATUSES)], "created_at": micros, "updated_at": micros,
                     "shipping": {"address": "1 Bench St", "carrier": "DHL", "tracking_number": None}
                     if i % 5 == 0 else None},
        }
        value, headers = encode_message(schema, record)
        out.append((key.encode(), value, headers))
    return out


async def prefill(bootstrap: str, topic: str, events: Prepared) -> float:
    """Produce `events` (key-partitioned, acks=all); seconds taken."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20,
                                request_timeout_ms=30000)
    await producer.start()
    t0 = time.monotonic()
    try:
        for start in range(0, len(events), 5000):
            futures = [await producer.send(topic, value, key=key, headers=headers)
                       for key, value, headers in events[start:start + 5000]]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.monotonic() - t0


class CountReader:
    """Counts the messages of every partition of a topic (from the beginning, or from its current
    end); notes when the first and the n-th arrived."""

    def __init__(self, bootstrap: str, topic: str, n: int, *, from_end: bool = False) -> None:
        """Count up to `n` messages of `topic`, those already there too unless `from_end`."""
        self.bootstrap = bootstrap
        self.topic = topic
        self.n = n
        self.from_end = from_end
        self.count = 0
        self.first_at: float | None = None
        self.done_at: float | None = None
        self.first = asyncio.Event()
        self.done = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "CountReader":
        """Assign every partition, position the consumer and start counting in the background."""
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=5, auto_offset_reset="earliest")
        await self._consumer.start()
        deadline = time.monotonic() + 10
        partitions: set[int] | None = None
        while not partitions:
            await self._consumer.topics()
            partitions = self._consumer.partitions_for_topic(self.topic)
            if not partitions:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topic {self.topic} does not exist")
                await asyncio.sleep(0.05)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        if self.from_end:
            # Read up to the end rather than seek_to_end(): Tansu 0.6 answers ListOffsets(latest)
            # with the last record batch's base offset + 1, so seeking there would count the
            # rest of that batch (the previous variant's output) again.
            empty = 0
            while empty < 2:
                batch = await self._consumer.getmany(timeout_ms=200, max_records=10_000)
                empty = 0 if batch else empty + 1
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"count-{self.topic}")
        return self

    async def _run(self) -> None:
        """Count what arrives, noting the times of the first and the n-th message."""
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            if not batch:
                continue
            now = time.monotonic()
            self.count += sum(len(msgs) for msgs in batch.values())
            if self.first_at is None:
                self.first_at = now
                self.first.set()
            if self.count >= self.n and self.done_at is None:
                self.done_at = now
                self.done.set()

    @property
    def rate(self) -> float:
        """Messages per second from the first to the n-th (n - 1 intervals)."""
        if self.first_at is None or self.done_at is None or self.done_at <= self.first_at:
            return float("nan")
        return (self.n - 1) / (self.done_at - self.first_at)

    async def __aexit__(self, *exc: object) -> None:
        """Stop counting and close the consumer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


async def wait_event(event: asyncio.Event, timeout: float, child: Child | None, what: str) -> None:
    """Wait for `event`; fail early if `child` exited, with its log."""
    deadline = time.monotonic() + timeout
    while not event.is_set():
        if child is not None and child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode} before {what}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s" + (f":\n{child.tail()}" if child else ""))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), 0.2)


# --------------------------------------------------------------------------------------------
# Commit -> visible (views, cache)
# --------------------------------------------------------------------------------------------

Visible = Callable[[str], Awaitable[bool]]


async def commit_to_visible(db: Database, tail: TailReader, visible: Visible, rate: float, seconds: float,
                            sample_every: int, interval: float, timeout: float = 30.0) -> dict[str, Any]:
    """Commit one new Order every 1/rate s (open loop); poll every `sample_every`-th until `visible`.

    One poller checks every pending sampled order concurrently, then sleeps what is left of
    `interval`. Returns latencies (ms) commit -> visible and, for the same orders, commit ->
    delivery on `tail`'s topic.
    """
    commit_at: dict[str, float] = {}
    committed: list[str] = []
    pending: dict[str, float] = {}
    seen: dict[str, float] = {}
    polls = 0
    stopping = asyncio.Event()

    async def fire(i: int) -> None:
        async with db.session() as s:
            order = Order(customer_id=i % 1000, amount_cents=1999, currency="EUR")
            s.add(order)
        committed.append(str(order.id))
        if i % sample_every == 0:
            commit_at[str(order.id)] = pending[str(order.id)] = time.monotonic()

    async def check(key: str) -> None:
        nonlocal polls
        polls += 1
        if await visible(key):
            seen.setdefault(key, time.monotonic())
            pending.pop(key, None)

    async def poller() -> None:
        loop = asyncio.get_running_loop()
        while not stopping.is_set() or pending:
            t = loop.time()
            if pending:
                await asyncio.gather(*(check(k) for k in list(pending)))
            await asyncio.sleep(max(0.0, interval - (loop.time() - t)))

    task = asyncio.get_running_loop().create_task(poller(), name="visibility-poller")
    t0 = time.monotonic()
    try:
        n, took = await paced(rate, seconds, fire)
        stopping.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    polled_for = time.monotonic() - t0
    await tail.wait_for_keys(set(commit_at), timeout=5)
    lat = [(seen[k] - t) * 1000 for k, t in commit_at.items() if k in seen]
    delivery = [(tail.received[k] - t) * 1000 for k, t in commit_at.items() if k in tail.received]
    return {"n": n, "rate": n / took, "sampled": len(commit_at), "missing": len(commit_at) - len(lat),
            "p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat, default=float("nan")),
            "delivery_p50": percentile(delivery, 50), "delivery_p99": percentile(delivery, 99),
            "polls_per_s": polls / polled_for, "committed": committed, "sampled_keys": list(commit_at)}


def fmt_visible(r: dict[str, Any]) -> str:
    """One progress line of a commit -> visible round."""
    return (f"{r['n']} commits at {r['rate']:.0f}/s, {r['sampled']} sampled: visible p50 {r['p50']:.1f} / "
            f"p99 {r['p99']:.1f} / max {r['max']:.1f} ms, missing {r['missing']}; commit -> delivery p50 "
            f"{r['delivery_p50']:.1f} / p99 {r['delivery_p99']:.1f} ms; {r['polls_per_s']:.0f} polls/s")

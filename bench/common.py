"""Shared pieces of the benchmarks: servers, a throwaway database, the plain model, the table."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, String, func
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import models  # noqa: F401  # registers the demo models on EventedBase
from app.embedded.broker import EmbeddedBroker
from app.embedded.postgres import EmbeddedPostgres
from app.orm import Database
from app.outbox.relay import to_messages
from app.schema import create_all
from app.settings import Settings
from app.wire.messages import Outgoing
from models.order import STATUSES

# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def note(msg: str) -> None:
    """Progress line on stderr (the result table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(min(rank, len(ordered))) - 1]


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """`median (min..max, n rounds)` for the progress log."""
    return (f"{fmt.format(median(values))} (min {fmt.format(min(values))}, "
            f"max {fmt.format(max(values))}, {len(values)} rounds)")


@dataclass
class Line:
    """One line of the result table."""

    what: str
    ours: float
    baseline: float
    unit: str
    target: str
    # ok(ours, ratio) -> met? None when the line is a reference without target.
    check: Callable[[float, float], bool] | None = None
    fmt: str = "{:,.0f}"

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    def row(self) -> list[str]:
        met = "" if self.check is None else ("yes" if self.check(self.ours, self.ratio) else "**NO**")
        return [self.what, f"{self.fmt.format(self.ours)} {self.unit}",
                f"{self.fmt.format(self.baseline)} {self.unit}", f"{self.ratio:.2f}", self.target, met]


def markdown_table(lines: list[Line]) -> str:
    header = ["what", "ours", "raw baseline", "ratio", "target", "met"]
    rows = [header, ["---"] * len(header), *(line.row() for line in lines)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


@dataclass
class Config:
    """Round counts and sizes; `--quick` shrinks them."""

    quick: bool = False
    orm_rounds: int = 5
    orm_seconds: float = 1.0
    latency_rounds: int = 5
    latency_seconds: float = 5.0
    latency_rate: float = 500.0
    relay_rounds: int = 3
    relay_backlog: int = 50_000
    relay_chunk: int = 5_000
    raw_batch: int = 2_000

    @classmethod
    def make(cls, quick: bool) -> "Config":
        if not quick:
            return cls()
        return cls(quick=True, orm_rounds=2, orm_seconds=0.5, latency_rounds=2, latency_seconds=2.0,
                   relay_rounds=2, relay_backlog=10_000)


# --------------------------------------------------------------------------------------------
# Servers and a throwaway database
# --------------------------------------------------------------------------------------------


@dataclass
class Env:
    """Where the benchmarks run: a fresh database on PostgreSQL and a fresh embedded broker."""

    url: str  # SQLAlchemy URL (postgresql+asyncpg://) of the benchmark's own database
    broker: EmbeddedBroker
    external_pg: bool
    settings: Settings = field(init=False)

    def __post_init__(self) -> None:
        self.settings = Settings(database_url=self.url, kafka_broker=self.broker.url)

    @property
    def dsn(self) -> str:
        """The database URL in asyncpg form."""
        return self.settings.asyncpg_dsn

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap


def _asyncpg_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def servers() -> Iterator[tuple[str, EmbeddedBroker, bool]]:
    """(server URL, broker, external?) — PostgreSQL from DATABASE_URL or embedded; Tansu embedded.

    Every server started here is stopped (by its PID, through `stop()`) on the way out, and
    the embedded PostgreSQL's cluster deleted (as root it lives outside `run_dir`).
    """
    run_dir = Path(tempfile.mkdtemp(prefix="mse-bench-"))
    started: list[Any] = []
    try:
        url = os.environ.get("DATABASE_URL", "")
        external = bool(url)
        if external:
            url = make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
            note(f"PostgreSQL from DATABASE_URL ({make_url(url).host}:{make_url(url).port})")
            postmaster = _postmaster_pid()
            if postmaster is not None:  # its CPU (backends included) in the breakdowns, as an embedded one's
                SERVER_PIDS["postgres"] = postmaster
        else:
            pg = EmbeddedPostgres.start(run_dir / "postgres")
            started.append(pg)
            SERVER_PIDS["postgres"] = pg.pid
            url = pg.url
            note(f"embedded PostgreSQL pid={pg.pid} on {pg.host}:{pg.port}")
        broker = EmbeddedBroker.start(run_dir / "broker")
        started.append(broker)
        SERVER_PIDS["tansu"] = broker.pid
        note(f"embedded Tansu broker pid={broker.pid} on {broker.bootstrap}")
        yield url, broker, external
    finally:
        for server in reversed(started):
            SERVER_PIDS.clear()
            try:
                server.remove() if isinstance(server, EmbeddedPostgres) else server.stop()
                note(f"stopped {type(server).__name__} pid={server.pid}")
            except Exception as exc:  # keep stopping the others
                note(f"could not stop {server!r}: {exc}")
        shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """CREATE DATABASE bench_<random> on the server; DROP ... WITH (FORCE) at the end."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin_dsn = _asyncpg_url(server_url)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    note(f"created database {name}")
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            note(f"dropped database {name}")
        finally:
            await conn.close()


# --------------------------------------------------------------------------------------------
# The plain (non-evented) twin of Order, and schema setup
# --------------------------------------------------------------------------------------------


class PlainBase(DeclarativeBase):
    """A plain SQLAlchemy 2 base: no listeners, no outbox."""


class PlainOrder(PlainBase):
    """Same columns, defaults, index, check constraint and relationship as `models.Order`; its
    own table. The ORM's work for the `shipping` relationship is the same on both sides."""

    __tablename__ = "plain_orders"
    __table_args__ = (CheckConstraint(f"status IN {STATUSES!r}", name="plain_orders_status_valid"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer_id: Mapped[int] = mapped_column(BigInteger, index=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=func.now(), onupdate=func.now()
    )

    shipping: Mapped["PlainOrderShipping | None"] = relationship(
        back_populates="order", uselist=False, cascade="all, delete-orphan", passive_deletes=True
    )


class PlainOrderShipping(PlainBase):
    """`models.OrderShipping`'s twin: the one-to-one extension of PlainOrder."""

    __tablename__ = "plain_order_shipping"

    order_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("plain_orders.id", ondelete="CASCADE"), primary_key=True
    )
    address: Mapped[str] = mapped_column(String(500))
    carrier: Mapped[str] = mapped_column(String(100))
    tracking_number: Mapped[str | None] = mapped_column(String(100), nullable=True)

    order: Mapped[PlainOrder] = relationship(back_populates="shipping")


RAW_TABLE = "raw_orders"


async def create_schema(env: Env) -> None:
    """Entity tables + outbox (`app.schema.create_all`), the plain and the raw table."""
    db = Database(env.url, service="orders")
    try:
        await create_all(db.engine)
        async with db.engine.begin() as conn:
            await conn.run_sync(PlainBase.metadata.create_all)
    finally:
        await db.close()
    conn = await asyncpg.connect(env.dsn)
    try:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {RAW_TABLE} (LIKE plain_orders INCLUDING ALL)")
    finally:
        await conn.close()


async def execute(env: Env, sql: str) -> Any:
    conn = await asyncpg.connect(env.dsn)
    try:
        return await conn.execute(sql)
    finally:
        await conn.close()


async def settle() -> None:
    """Between rounds: collect garbage and let PostgreSQL/broker background work catch up a bit."""
    gc.collect()
    await asyncio.sleep(0.2)


# --------------------------------------------------------------------------------------------
# Kafka helpers
# --------------------------------------------------------------------------------------------


async def create_topic(env: Env, topic: str, partitions: int | None = None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions or env.settings.topic_partitions, 1)])
    finally:
        await admin.close()


def sample_message(key: str = "1") -> Outgoing:
    """A message exactly as the relay builds it for a new Order (Avro value + CloudEvents headers)."""
    now = datetime.now(timezone.utc)
    micros = int(now.timestamp() * 1_000_000)
    row = {
        "topic": "orders-v2", "entity": "orders", "schema_version": 2, "key": key,
        "event_id": uuid.uuid4(), "op": "create", "service": "orders", "occurred_at": now,
        "sequence": 1,
        "data": {"id": int(key), "customer_id": 7, "amount_cents": 1999, "currency": "EUR",
                 "status": "pending", "created_at": micros, "updated_at": micros, "shipping": None},
    }
    [msg] = to_messages(row)
    return msg


class TailReader:
    """A consumer on every partition of a topic, from its current end; records first-receive times."""

    def __init__(self, bootstrap: str, topic: str, on: Callable[[Any, float], None] | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        #: Called with every message and the wall-clock time its batch arrived.
        self.on = on
        self.received: dict[str, float] = {}
        self.duplicates = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "TailReader":
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5,
        )
        await self._consumer.start()
        deadline = time.monotonic() + 10
        partitions: set[int] | None = None
        while not partitions:
            await self._consumer.topics()  # refreshes cluster metadata
            partitions = self._consumer.partitions_for_topic(self.topic)
            if not partitions:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topic {self.topic} does not exist")
                await asyncio.sleep(0.05)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, not lazily on the first fetch
            await self._consumer.position(tp)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"tail-{self.topic}")
        return self

    async def _run(self) -> None:
        assert self._consumer is not None
        received = self.received
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now, wall = time.monotonic(), time.time()
            for msgs in batch.values():
                for m in msgs:
                    if self.on is not None:
                        self.on(m, wall)
                    key = (m.key or b"").decode()
                    if key in received:
                        self.duplicates += 1
                    else:
                        received[key] = now
            if batch:
                self._changed.set()

    async def wait_for_keys(self, keys: set[str], timeout: float) -> set[str]:
        """Wait until every key was received (or timeout); the keys still missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = {k for k in keys if k not in self.received}
            remaining = deadline - time.monotonic()
            if not missing or remaining <= 0:
                return missing
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


#: name -> PID of the servers this run started, for the CPU breakdown in the progress log.
SERVER_PIDS: dict[str, int] = {}
#: CPU (in cores) used by processes other than this benchmark and its servers, per measurement.
OTHER_CPU: list[float] = []


def process_cpu(pid: int) -> float:
    """CPU seconds of a process, its live children and its reaped children (PostgreSQL backends)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total
    except Exception:
        return float("nan")


def _postmaster_pid() -> int | None:
    """The PID of a PostgreSQL server running on this machine (DATABASE_URL's, when local)."""
    try:
        import psutil

        for proc in psutil.process_iter(["name", "ppid"]):
            if proc.info["name"] == "postgres":
                with contextlib.suppress(psutil.Error):
                    if psutil.Process(proc.info["ppid"]).name() != "postgres":
                        return int(proc.pid)
    except Exception:
        return None
    return None


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # user..steal; guest time is already counted in user
    return total - idle, total


class LoopMonitor:
    """While active: event-loop lag (how late a 1 ms timer fires), this process's CPU share,
    and how busy the whole machine was (other processes included)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._cpu0 = self._wall0 = 0.0
        self._machine0 = (0.0, 0.0)
        self._servers0: dict[str, float] = {}
        self.cpu_share = float("nan")
        self.machine_busy = float("nan")
        self.servers: dict[str, float] = {}  # server -> CPU share (cores) while active

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.001)
            self.lags.append((loop.time() - t - 0.001) * 1000)

    def __enter__(self) -> "LoopMonitor":
        self._cpu0, self._wall0 = time.process_time(), time.monotonic()
        self._machine0 = machine_busy()
        self._servers0 = {name: process_cpu(pid) for name, pid in SERVER_PIDS.items()}
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop-monitor")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        wall = max(time.monotonic() - self._wall0, 1e-9)
        self.cpu_share = (time.process_time() - self._cpu0) / wall
        busy, total = machine_busy()
        self.machine_busy = (busy - self._machine0[0]) / max(total - self._machine0[1], 1e-9)
        self.servers = {name: (process_cpu(pid) - self._servers0[name]) / wall
                        for name, pid in SERVER_PIDS.items()}
        OTHER_CPU.append(self.other)

    @property
    def other(self) -> float:
        """Cores used by other processes on the machine while active (noise)."""
        ours = self.cpu_share + sum(self.servers.values())
        return max(self.machine_busy * (os.cpu_count() or 1) - ours, 0.0)

    def summary(self) -> str:
        cpus = os.cpu_count() or 1
        parts = [f"bench {self.cpu_share:.2f}"] + [f"{n} {v:.2f}" for n, v in self.servers.items()]
        parts.append(f"other processes {self.other:.2f}")
        return (f"loop lag p50 {percentile(self.lags, 50):.1f} / p99 {percentile(self.lags, 99):.1f} ms; "
                f"machine {self.machine_busy:.0%} busy of {cpus} CPUs, in cores: " + ", ".join(parts))


async def paced(rate: float, seconds: float,
                fire: Callable[[int], Coroutine[Any, Any, None]]) -> tuple[int, float]:
    """Open-loop load: start `fire(i)` as a task at t0 + i/rate (a schedule, no drift).

    Returns (started, seconds the schedule took). A slow `fire` never delays later starts.
    """
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    n = int(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    def done(t: asyncio.Task[None]) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            errors.append(t.exception())  # type: ignore[arg-type]

    t0 = loop.time()
    for i in range(n):
        delay = t0 + i * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(fire(i))
        tasks.add(task)
        task.add_done_callback(done)
    elapsed = loop.time() - t0
    if tasks:
        await asyncio.wait(set(tasks))
    if errors:
        raise errors[0]
    return n, elapsed

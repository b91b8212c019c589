"""Inbox events/s: `Inbox` at 1 and 100 events per transaction vs a raw aiokafka + asyncpg consumer.

Each round pre-fills a fresh topic on the run's broker with N valid orders-v2 create events
(distinct keys, `bench.workers.v2_events`), then every variant drains it from offset 0, in
rotating order, each as its own child process (as a service runs its consumer, like
`python -m services billing`), with a fresh consumer name:
- inbox, batch 1 and batch 100: `python -m bench.inbox inbox`, an `Inbox` (service `billing`,
  defaults otherwise) that inserts one row per event (order id, amount, currency) into
  `bench_inbox_rows` through the session: at batch 1 with a `handler`, at batch 100 with a
  `batch_handler` writing the transaction's rows in one `executemany`;
- raw: `python -m bench.inbox raw`, an `AIOKafkaConsumer` (assign, seek to the beginning) that
  decodes each message with `app.wire.messages.decode` and inserts the same rows with asyncpg,
  one transaction (`executemany`) per fetched batch of up to 100 (as the batched inbox), committing the Kafka
  offsets after each database commit; no deduplication.
The row table (and `inbox`, `inbox_keys`) is truncated before each variant. The bench polls
`count(*)` of the rows every 20 ms and times the first observation with some to the first with
all N, so start-up is excluded; the CPU of the child over that span, per event, comes with it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.inbox.consumer import Inbox
from app.inbox.events import InboxEvent
from app.kafka import delete_topics, make_admin, topic_partitions
from app.orm import Database
from app.settings import Settings
from app.topology import inbox_dead_letter_topic
from app.wire.messages import decode
from app.wire.schemas import load
from bench.catchup import Watch, _poll
from bench.common import Config, Env, Line, LoopMonitor, execute, median, note, process_cpu, settle, spread
from bench.workers import Child, Prepared, child_env, create_topics, prefill, spawn, stop_child, tracked, v2_events

ORDERS = load("orders", 2)
#: The service the inbox consumers belong to (their names start with `billing.`).
SERVICE = "billing"
TABLE = "bench_inbox_rows"
#: variant -> events per transaction of the inbox (None: the raw consumer).
VARIANTS: dict[str, int | None] = {"inbox-1": 1, "inbox-100": 100, "raw": None}
#: Records per fetch of the raw consumer, and so per transaction: as many as the batched
#: inbox's, so both pay the same number of commits.
RAW_FETCH = 100
ROUNDS, EVENTS = 3, 20_000
QUICK_ROUNDS, QUICK_EVENTS = 1, 5_000

DDL = (f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, order_id bigint NOT NULL, "
       "amount_cents bigint NOT NULL, currency varchar(3) NOT NULL)")
RAW_INSERT = f"INSERT INTO {TABLE} (order_id, amount_cents, currency) VALUES ($1, $2, $3)"
SESSION_INSERT = text(f"INSERT INTO {TABLE} (order_id, amount_cents, currency) VALUES (:o, :a, :c)")


def row_of(key: str, data: dict[str, Any]) -> tuple[int, int, str]:
    """The row an event writes: (order id, amount, currency)."""
    return int(key), data["amount_cents"], data["currency"]


# --------------------------------------------------------------------------------------------
# The consumers, each run as a child process until SIGTERM
# --------------------------------------------------------------------------------------------


def _stop_on_signals(stop: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


async def consume_with_inbox(topic: str, name: str, batch: int) -> None:
    """An `Inbox` applying `topic` with `batch` events per transaction, one row per event."""
    settings = Settings.from_env()
    db = Database(settings.database_url_for(SERVICE), service=SERVICE)

    async def write_rows(session: AsyncSession, events: list[InboxEvent]) -> None:
        rows = [row_of(event.key, event.data or {}) for event in events]
        await session.execute(SESSION_INSERT, [{"o": o, "a": a, "c": c} for o, a, c in rows])

    async def write_row(session: AsyncSession, event: InboxEvent) -> None:
        await write_rows(session, [event])

    handlers: dict[str, Any] = {"batch_handler": write_rows} if batch > 1 else {"handler": write_row}
    inbox = Inbox(settings, db, name, [topic], batch=batch, schema_of=lambda _: ORDERS, **handlers)
    _stop_on_signals(inbox.stop)
    try:
        await inbox.run()
    finally:
        await db.close()
        s = inbox.stats
        print(f"stats: applied {s.applied}, batches {s.batches}, duplicates {s.skipped_duplicate}, "
              f"old {s.skipped_old}, dead letters {s.dead_lettered}, handler errors {s.handler_errors}", flush=True)


async def consume_raw(topic: str, name: str) -> None:
    """Decode and insert every fetched batch in one transaction, then commit its offsets; no dedup."""
    settings = Settings.from_env()
    stopping = asyncio.Event()
    _stop_on_signals(stopping.set)
    conn = await asyncpg.connect(settings.asyncpg_dsn_for(SERVICE))
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=name,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms)
    await consumer.start()
    batches = applied = 0
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not stopping.is_set():
            fetched = await consumer.getmany(*tps, timeout_ms=200, max_records=RAW_FETCH)
            rows = []
            for records in fetched.values():
                for record in records:
                    event = decode(ORDERS, record.value)
                    rows.append(row_of(event["key"], event["data"]))
            if not rows:
                continue
            async with conn.transaction():
                await conn.executemany(RAW_INSERT, rows)
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in fetched.items() if rs})
            batches += 1
            applied += len(rows)
    finally:
        await consumer.stop()
        await conn.close()
        print(f"stats: applied {applied}, batches {batches}", flush=True)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def _stats_line(child: Child) -> str:
    """The `stats:` line the child printed on its way out."""
    lines = [line for line in child.tail(200).splitlines() if line.startswith("stats: ")]
    return lines[-1].removeprefix("stats: ") if lines else "no stats printed"


async def _drain(env: Env, topic: str, variant: str, run_dir: Path, n: int, timeout: float) -> dict[str, Any]:
    """Start the variant's consumer on `topic`; time its rows from the first seen to the n-th."""
    await execute(env, f"TRUNCATE {TABLE}, inbox, inbox_keys")
    await settle()
    batch = VARIANTS[variant]
    name = f"{SERVICE}.bench-{variant}-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "bench.inbox", "inbox" if batch else "raw", topic, name]
    if batch:
        argv += ["--batch", str(batch)]
    conn = await asyncpg.connect(env.dsn)
    child = spawn(variant, argv, run_dir / f"{name}.log",
                  child_env(DATABASE_URL=env.url, KAFKA_BROKER=env.broker.url))
    watch, stop = Watch(), asyncio.Event()
    cpu0: list[float] = []

    async def count() -> int:
        rows = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
        if rows and not cpu0:
            cpu0.append(process_cpu(child.pid))  # from the first row on: start-up is not per-event work
        return rows

    async def until(seen: Any) -> None:
        while not seen():
            if child.proc.poll() is not None:
                raise RuntimeError(f"{variant} exited with {child.proc.returncode}:\n{child.tail()}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{variant}: {watch.last:,} of {n:,} rows after {timeout:.0f} s:\n{child.tail()}")
            await asyncio.sleep(0.01)

    t0 = time.monotonic()
    poller = asyncio.ensure_future(_poll(0.02, count, watch, n, stop))
    try:
        await until(lambda: watch.first_at is not None)
        with tracked(**{variant: child.pid}), LoopMonitor() as monitor:  # over the timed span only
            await until(lambda: watch.done_at is not None)
            cpu = process_cpu(child.pid) - cpu0[0]
        await asyncio.sleep(0.3)  # rows beyond n (applied twice) would show now
        extra = await conn.fetchval(f"SELECT count(*) FROM {TABLE}") - n
    finally:
        stop.set()
        await poller
        await asyncio.to_thread(stop_child, child)
        await conn.close()
    done_at, first_at = watch.done_at or 0.0, watch.first_at or 0.0
    return {"rate": watch.rate(n), "seconds": done_at - first_at, "first": watch.first_count, "extra": extra,
            "cpu_us": cpu / max(n - watch.first_count, 1) * 1e6, "start": first_at - t0, "monitor": monitor,
            "stats": _stats_line(child), "dlq": inbox_dead_letter_topic(topic, name) if batch else None}


async def _delete_topics(env: Env, topics: list[str]) -> None:
    """Delete the topics this benchmark created (the pre-filled ones and the inboxes' dead-letter topics)."""
    admin = make_admin(env.settings)
    await admin.start()
    try:
        await delete_topics(admin, topics)
    finally:
        await admin.close()


async def run(env: Env, cfg: Config) -> list[Line]:
    """Rounds of the three variants, each round on a fresh pre-filled topic."""
    rounds, n = (QUICK_ROUNDS, QUICK_EVENTS) if cfg.quick else (ROUNDS, EVENTS)
    events: Prepared = v2_events(n)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    topics: list[str] = []
    run_dir = Path(tempfile.mkdtemp(prefix="mse-bench-inbox-"))
    ok = False
    await execute(env, DDL)
    try:
        for r in range(rounds):
            topic = f"bench-inbox-{uuid.uuid4().hex[:8]}"
            topics.append(topic)
            await create_topics(env.bootstrap, [topic], env.settings.topic_partitions)
            took = await prefill(env.bootstrap, topic, events)
            note(f"inbox round {r + 1}/{rounds}: {n:,} events pre-filled on {topic} in {took:.2f} s")
            for variant in names[r % len(names):] + names[:r % len(names)]:
                res = await _drain(env, topic, variant, run_dir, n, timeout=max(300.0, n / 20))
                results[variant].append(res)
                topics += [res["dlq"]] if res["dlq"] else []
                note(f"inbox round {r + 1} {variant}: {n - res['first']:,} rows in {res['seconds']:.2f} s = "
                     f"{res['rate']:,.0f}/s ({res['extra']} beyond N; first row {res['start']:.1f} s after spawn), "
                     f"{res['cpu_us']:.0f} µs of its CPU per event; {res['stats']}; {res['monitor'].summary()}")
        ok = not any(x["extra"] for xs in results.values() for x in xs)
    finally:
        await execute(env, f"DROP TABLE IF EXISTS {TABLE}")
        await execute(env, "TRUNCATE inbox, inbox_keys")
        try:
            await _delete_topics(env, topics)
            note(f"inbox: deleted its {len(topics)} topics (pre-filled and the inboxes' dead-letter topics)")
        except Exception as exc:  # they go with the run's broker anyway
            note(f"inbox: could not delete its topics: {exc!r}")
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            note(f"inbox: logs kept in {run_dir}")
    rates = {v: [x["rate"] for x in results[v]] for v in VARIANTS}
    cpu = {v: median([x["cpu_us"] for x in results[v]]) for v in VARIANTS}
    for v in VARIANTS:
        note(f"inbox {v}: {spread(rates[v])} events/s, {cpu[v]:.0f} µs of its CPU per event")
    base = median(rates["raw"])
    label = f"{n:,} pre-filled, one row each"
    return [
        Line(f"inbox events/s, 1 event per transaction, {label} (vs raw aiokafka + asyncpg, no dedup)",
             median(rates["inbox-1"]), base, "/s", "reference"),
        Line(f"inbox events/s, 100 events per transaction, {label} (vs raw aiokafka + asyncpg, no dedup)",
             median(rates["inbox-100"]), base, "/s", "ratio >= 0.5", lambda ours_, ratio: ratio >= 0.5),
        Line("inbox process CPU per event, 1 per transaction (vs raw consumer)", cpu["inbox-1"], cpu["raw"], "µs",
             "reference"),
        Line("inbox process CPU per event, 100 per transaction (vs raw consumer)", cpu["inbox-100"], cpu["raw"],
             "µs", "reference"),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run one consumer until SIGTERM (DATABASE_URL and KAFKA_BROKER from the environment)."""
    parser = argparse.ArgumentParser(prog="python -m bench.inbox")
    parser.add_argument("consumer", choices=("inbox", "raw"))
    parser.add_argument("topic")
    parser.add_argument("name", help="the consumer's name (its group and inbox rows)")
    parser.add_argument("--batch", type=int, default=100, help="inbox: events per transaction")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.consumer == "inbox":
        asyncio.run(consume_with_inbox(args.topic, args.name, args.batch))
    else:
        asyncio.run(consume_raw(args.topic, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())

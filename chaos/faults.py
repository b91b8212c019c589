"""The faults: each breaks one part of a running stack while the load generator writes.

A fault returns notes for the reliability table (restarts, pause lengths, dead letters). It
restarts only servers the stack started itself.
"""
from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import insert

from app.cache import connect_redis
from app.embedded.postgres import EmbeddedPostgres
from app.orm import Database
from chaos.stack import Process, Stack, StackError
from models import Order

Notes = dict[str, Any]
FaultFn = Callable[[Stack], Awaitable[Notes]]


@dataclass(frozen=True)
class Fault:
    """A named fault, and how many workers it needs running when it starts."""

    name: str
    act: FaultFn
    workers: int = 1


def kill_worker(times: int = 5, between: float = 1.0, ready_within: float | None = None) -> FaultFn:
    """SIGKILL the worker and start it again, `times` times.

    Each kill comes `between` s after the worker is ready, or after `ready_within` s if it is
    not ready by then (a kill during start-up and recovery); the last start waits for ready.
    """
    async def act(stack: Stack) -> Notes:
        early = killed = 0
        for i in range(times):
            await asyncio.sleep(between)  # let it work (and commit) a little before the next crash
            worker = await stack.live_worker()  # the supervisor may be starting it again
            # Counted only when a live worker died of it: the note is what happened, not what was asked.
            killed += worker.kill()
            last = i == times - 1
            if not await restart(worker, 90 if last or ready_within is None else ready_within):
                if last:
                    raise StackError(f"worker {worker.name} not ready after its last restart; see {worker.log}")
                early += 1
        return {"kills": killed, "killed before ready": early}
    return act


async def restart(worker: Process, ready_within: float, give_up_after: float = 120.0) -> bool:
    """Start `worker` again as a supervisor would: a start that exits (say PostgreSQL is down
    for the moment, and `python -m app worker` refuses to start without it) is retried (for a
    supervised process, by the stack)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    while True:
        worker.spawn()
        try:
            return await worker.wait_ready(ready_within)
        except StackError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(1.0)


async def restart_until_ready(worker: Process, timeout: float = 90.0) -> None:
    """Start `worker` again and wait until it is ready; StackError if it is not within `timeout` s."""
    if not await restart(worker, timeout):
        raise StackError(f"{worker.title} not ready {timeout:.0f} s after a restart; see {worker.log}")


def kill_billing(times: int = 4, seed: int = 4) -> FaultFn:
    """SIGKILL the billing service `times` times, each at a random moment 0.2-2 s after it is
    ready (mid-batch, or between its database commit and its offset commit), restarting it.

    The note "redeliveries skipped" counts events each restarted process found already applied
    (a kill after a database commit and before its offset commit), as its inbox reports them.
    """
    async def act(stack: Stack) -> Notes:
        rng, billing, killed, skipped = random.Random(seed), stack.billing, 0, 0
        assert billing is not None
        for i in range(times + 1):
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            if i:  # a restarted process: the previous kill's redeliveries come first
                status = await billing.status()
                skipped += status["skipped_duplicate"] if status else 0
            if i == times:
                break
            killed += billing.kill()
            if not await restart(billing, 60):
                raise StackError(f"billing not ready after a restart; see {billing.log}")
        return {"billing kills": killed, "redeliveries skipped": skipped}
    return act


def pause_broker(seconds: float = 20.0) -> FaultFn:
    """SIGSTOP the broker for `seconds`, then SIGCONT."""
    async def act(stack: Stack) -> Notes:
        stack.broker.pause()
        try:
            await asyncio.sleep(seconds)
        finally:
            stack.broker.resume()
        return {"broker paused": f"{seconds:.0f} s"}
    return act


def restart_postgres(down: float = 2.0) -> FaultFn:
    """Stop PostgreSQL (fast shutdown: every connection dropped), and start it `down` s later."""
    async def act(stack: Stack) -> Notes:
        old = stack.postgres
        started = time.monotonic()
        await asyncio.to_thread(old.stop)
        await asyncio.sleep(down)  # writes fail meanwhile: the load generator retries them
        stack.postgres = await asyncio.to_thread(EmbeddedPostgres.start, old.data_dir, port=old.port,
                                                 settings=old.settings)
        return {"postgres down": f"{time.monotonic() - started:.1f} s"}
    return act


def restart_and_flush_redis(between: float = 3.0, refill_within: float = 60.0) -> FaultFn:
    """Restart Redis (it keeps nothing: every entry is gone), then, `between` s later and once
    the cache agent has written to it again, FLUSHALL under load: two losses, the second of a
    refilled cache."""
    async def act(stack: Stack) -> Notes:
        await asyncio.to_thread(stack.redis.restart)
        restarted = time.monotonic()
        await asyncio.sleep(between)
        redis = connect_redis(stack.settings.redis_url, timeout=5)
        try:
            # The refill is waited for, not assumed: how soon the agent writes again depends on
            # its retry backoff (up to 2 s) and on how far behind the load the worker runs. On a
            # machine twice as slow, 3 s found an empty cache, and the flush then lost nothing.
            flushed = await redis.dbsize()
            while flushed == 0 and time.monotonic() - restarted < refill_within:
                await asyncio.sleep(0.1)
                flushed = await redis.dbsize()
            refilled = time.monotonic() - restarted
            await redis.flushall()
        finally:
            await redis.aclose()
        return {"redis restarted, then flushed": f"{flushed} keys, {refilled:.1f} s after the restart",
                "_flushed keys": flushed}
    return act


def kill_one_of_two() -> FaultFn:
    """With two workers, SIGKILL the first (the relay's lock holder): the other takes over."""
    async def act(stack: Stack) -> Notes:
        first, *_ = stack.alive_workers
        first.kill()
        return {"killed": first.name, "survivor": stack.alive_workers[0].name}
    return act


def rolling_restart(rounds: int = 3, between: float = 1.0, grace: float = 30.0) -> FaultFn:
    """A rolling restart as users do one, with two workers, `rounds` times: SIGKILL the first and
    start it again, then SIGTERM the second (a graceful stop: `grace` s before SIGKILL, Compose's
    `stop_grace_period`) and start it again, each start waited for until the worker is ready."""
    async def act(stack: Stack) -> Notes:
        first, second = stack.alive_workers[:2]
        killed = graceful = 0
        for _ in range(rounds):
            await asyncio.sleep(between)
            killed += first.kill()
            await restart_until_ready(first)
            await asyncio.sleep(between)
            # In a thread: the load generator and the checker's readers share this event loop.
            graceful += await asyncio.to_thread(second.stop, grace) not in (None, -signal.SIGKILL)
            await restart_until_ready(second)
        return {"rounds": rounds, "kills": killed, "graceful stops": graceful}
    return act


def poison(count: int = 1000) -> FaultFn:
    """`count` undecodable or malformed messages on every topic the worker consumes."""
    async def act(stack: Stack) -> Notes:
        app_id = stack.settings.app_id
        topics = {"orders-v2": avro_poison, "customers-v1": avro_poison,
                  **{f"{app_id}-{view}-updates": json_poison
                     for view in ("customer_orders", "orders_by_status", "orders_per_minute")}}
        producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap_servers, linger_ms=5)
        await producer.start()
        try:
            for topic, make in topics.items():
                for i in range(count):
                    key, value = make(i)
                    await producer.send(topic, value, key=key)
            await producer.flush()
        finally:
            await producer.stop()
        return {"poison per topic": count, "topics": len(topics), "_poisoned": list(topics)}
    return act


def avro_poison(i: int) -> tuple[bytes | None, bytes | None]:
    """Random bytes, truncated records, empty values and tombstones, with and without keys."""
    kinds: list[tuple[bytes | None, bytes | None]] = [
        (f"poison-{i}".encode(), b"\xff" * 40),       # a varint that never ends
        (f"poison-{i}".encode(), b"\x02"),            # a record cut after its first byte
        (None, b"\x00\x00garbage"),
        (f"poison-{i}".encode(), None),               # a tombstone on an event topic
        (f"poison-{i}".encode(), b""),
    ]
    return kinds[i % len(kinds)]


def json_poison(i: int) -> tuple[bytes | None, bytes | None]:
    """Not JSON, JSON of the wrong shape, wrong types, null and missing keys."""
    kinds: list[tuple[bytes | None, bytes | None]] = [
        (f"{i}".encode(), b"{not json"),
        (f"{i}".encode(), b'{"x": 1}'),
        (f"{i}".encode(), b'{"p": "zero", "version": [], "value": {}}'),
        (f"{i}".encode(), b"null"),
        (None, b'{"p": 0, "version": 1, "value": 1}'),
        (b"not-a-number", b'{"p": 0, "version": 1, "value": 1}'),
        (f"{i}".encode(), b"\xc1\xff\x00 not utf-8"),
    ]
    return kinds[i % len(kinds)]


def pause_worker(seconds: float = 30.0) -> FaultFn:
    """SIGSTOP the worker for `seconds` while writes continue, then SIGCONT."""
    async def act(stack: Stack) -> Notes:
        worker = stack.alive_workers[0]
        worker.pause()
        try:
            await asyncio.sleep(seconds)
        finally:
            worker.resume()
        return {"worker paused": f"{seconds:.0f} s"}
    return act


def add_worker_during_backlog(backlog: float = 8.0) -> FaultFn:
    """Let a backlog build (the worker SIGSTOPped `backlog` s while writes go on), then resume it
    and start a second worker at once: the group rebalances while both catch up, and stage 1
    rebuilds the moved partitions' aggregates mid-backlog (the second worker once left a
    stage-2 count short of the truth for minutes)."""
    paused = pause_worker(backlog)

    async def act(stack: Stack) -> Notes:
        await paused(stack)
        added = await stack.add_worker()
        return {"backlog built for": f"{backlog:.0f} s", "added": added.name}
    return act


def two_workers_onto_a_backlog(orders: int = 3000) -> FaultFn:
    """SIGKILL both workers, commit `orders` orders in bulk while the load goes on (the outbox
    holds them all: the relay died with the workers), then start both at once: the group forms
    and splits the partitions while both catch up (issue: a stage-2 count once stayed short)."""
    async def act(stack: Stack) -> Notes:
        workers = stack.alive_workers
        killed = sum(worker.kill() for worker in workers)
        db = Database(stack.settings.database_url_for("orders"), service="orders", record_reads=False)
        try:
            async with db.session() as s:
                await s.execute(insert(Order), [{"customer_id": 90_000 + i % 50, "amount_cents": 100 + i,
                                                 "currency": "EUR"} for i in range(orders)])
        finally:
            await db.close()
        for worker in workers:
            worker.spawn()
        for worker in workers:
            if not await worker.wait_ready(120):
                raise StackError(f"worker {worker.name} not ready after starting onto the backlog; see {worker.log}")
        return {"backlog": orders, "killed": killed, "_committed writes": orders}
    return act


def storm(parts: list[FaultFn]) -> FaultFn:
    """Several faults at once (each on a different part of the stack)."""
    async def act(stack: Stack) -> Notes:
        notes: Notes = {}
        for result in await asyncio.gather(*(part(stack) for part in parts)):
            notes.update(result)
        return notes
    return act


def faults(*, kills: int = 5, broker_pause: float = 20.0, poison_count: int = 1000,
           worker_pause: float = 30.0, ready_within: float | None = None,
           billing_kills: int = 4) -> dict[str, Fault]:
    """Every fault of the suite, by name (`ready_within`: see `kill_worker`)."""
    return {
        "worker-kill": Fault(f"worker SIGKILL + restart x{kills}", kill_worker(kills, ready_within=ready_within)),
        "broker-pause": Fault(f"broker SIGSTOP {broker_pause:.0f} s", pause_broker(broker_pause)),
        "postgres-restart": Fault("PostgreSQL restart", restart_postgres()),
        "redis-restart": Fault("Redis restart + flush", restart_and_flush_redis()),
        "worker-takeover": Fault("2 workers, one SIGKILLed", kill_one_of_two(), workers=2),
        "rolling-restart": Fault("rolling restart of 2 workers x3 (SIGKILL one, SIGTERM the other)",
                                 rolling_restart(), workers=2),
        "poison": Fault(f"{poison_count} poison messages per input topic", poison(poison_count)),
        "worker-pause": Fault(f"worker SIGSTOP {worker_pause:.0f} s (slow consumer)", pause_worker(worker_pause)),
        "worker-added": Fault("a second worker added during a backlog", add_worker_during_backlog()),
        "two-onto-backlog": Fault("2 workers started together onto a backlog", two_workers_onto_a_backlog(),
                                  workers=2),
        "billing-kill": Fault(f"billing SIGKILL + restart x{billing_kills}", kill_billing(billing_kills)),
        # All at once: crashes, a frozen broker, a database and a cache restart, and poison.
        "storm": Fault("all at once: worker kills, broker pause, PostgreSQL + Redis restarts, poison",
                       storm([kill_worker(2, ready_within=ready_within), pause_broker(broker_pause / 2),
                              restart_postgres(), restart_and_flush_redis(), poison(poison_count // 5)])),
    }

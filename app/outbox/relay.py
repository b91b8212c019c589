"""The outbox relay: publishes committed outbox rows to Kafka in outbox order, then deletes them.

The outbox is split into `SHARDS` shards by a hash of the aggregate key (a column PostgreSQL
generates, app/outbox/store.py). Each relay publishes the shards whose advisory locks it holds, in
outbox order, so per-key order holds however many relays run. Relays balance themselves: each
counts the live relays (one membership lock per relay, visible in `pg_locks`) and holds at
most its fair share (ceil(shards / relays)), giving extra shards back between batches (after
their rows are deleted) and taking free ones up to its share, every `standby_poll` seconds
and at once when a relay joins or gives shards back (both NOTIFY `outbox_relays`). A relay
that dies loses its session and with it its locks: the others take its shards at their next
balance. Rows are deleted only after the broker acknowledged them: a crash in
between publishes them again with the same `event_id` (at-least-once), never loses them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from app.errors import is_transient
from app.kafka import ensure_topics
from app.outbox.store import CHANNEL, LAG_SQL, SHARDS
from app.retries import Backoff
from app.settings import WORKER, Settings
from app.topology import RELAY_DLQ_TOPIC, dual_publish_targets, evented_topics
from app.wire.convert import convert_record
from app.wire.deadletter import outbox_dead_letter
from app.wire.messages import Outgoing, encode_message, envelope, schema_for_topic
from app.wire.schemas import load

log = logging.getLogger(__name__)

#: Advisory lock class of the shards: (RELAY_LOCK, shard) is held by the relay publishing it.
RELAY_LOCK = 7325002
#: Advisory lock class of relay membership: each live relay holds (MEMBER_LOCK, its backend pid).
MEMBER_LOCK = 7325003
#: NOTIFY channel of relay membership changes (a relay joined, or gave shards back).
RELAYS_CHANNEL = "outbox_relays"
# Kafka's default partitioner (murmur2 of the key), as Java clients and aiokafka's send() use.
_PARTITIONER = DefaultPartitioner()

_FETCH = """
SELECT id, topic, entity, schema_version, key, event_id, op, service, occurred_at, sequence, data
FROM outbox WHERE shard = ANY($2::smallint[]) ORDER BY id LIMIT $1"""
#: Sessions holding an advisory lock of class $1 (two-key form) in this database.
LOCK_HOLDERS = """
SELECT count(DISTINCT pid) FROM pg_locks
WHERE locktype = 'advisory' AND classid = $1 AND objsubid = 2 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
_DELETE = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"


@dataclass
class RelayStats:
    """What the relay has done, for logs, `python -m app dev` and metrics."""

    published: int = 0
    batches: int = 0
    dead_lettered: int = 0
    errors: int = 0
    active: bool = False  # holds at least one shard
    shards: tuple[int, ...] = ()  # the outbox shards this relay publishes
    # True while the relay holds a database connection, active or standby (readiness).
    connected: bool = False
    pending_rows: int = 0
    oldest_seconds: float = 0.0
    #: What fails now ("" once the database and the broker answer again).
    error: str = ""
    #: The most recent error, kept after it cleared, and when it happened (Unix time; 0: never).
    last_error: str = ""
    last_error_at: float = 0.0


def to_messages(row: asyncpg.Record | dict[str, Any], dual: tuple[int, ...] = ()) -> list[Outgoing]:
    """The Kafka messages of one outbox row: its own version, then each dual-published one."""
    schema = schema_for_topic(row["topic"])
    record = envelope(row)
    key = row["key"].encode()
    value, headers = encode_message(schema, record)
    messages = [Outgoing(row["topic"], key, value, None, headers)]
    for version in dual:
        old = load(schema.entity, version)
        value, headers = encode_message(old, convert_record(record, version))
        messages.append(Outgoing(old.topic, key, value, None, headers))
    return messages


def dead_letter(row: asyncpg.Record, exc: BaseException) -> Outgoing:
    """A row that cannot be encoded, on the outbox dead-letter topic in the agents' dead-letter
    format (app/wire/deadletter.py), as JSON `python -m app dlq redrive` can publish again."""
    return outbox_dead_letter(RELAY_DLQ_TOPIC, row, exc)


class Relay:
    """Publishes the outbox; run it with `await relay.run()` and stop it with `relay.stop()`."""

    def __init__(self, settings: Settings, *, topics: list[str] | None = None,
                 standby_poll: float = 1.0, shards: int = SHARDS) -> None:
        self.settings = settings
        self.topics = topics if topics is not None else evented_topics()
        # topic -> older versions the relay publishes too ("dual-publish" legacy mode).
        self.dual: dict[str, tuple[int, ...]] = dual_publish_targets(settings)
        self.stats = RelayStats()
        self._standby_poll = standby_poll
        self._shard_count = shards
        self._wakeup = asyncio.Event()
        self._rebalance = asyncio.Event()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask the relay to finish its current batch and return from `run()`."""
        self._stopping.set()
        self._wakeup.set()
        self._rebalance.set()

    async def run(self) -> None:
        """Relay until stopped, reconnecting with backoff after database or broker failures."""
        backoff = Backoff(0.1, 5.0)
        while not self._stopping.is_set():
            try:
                await self._run_once()
                backoff.reset()
            except Exception as exc:  # database (OSError, asyncpg's), broker (KafkaError) and the unexpected
                self._failed(exc)
            if not self._stopping.is_set():
                await self._sleep(backoff.next())

    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.active = False
        self.stats.error = self.stats.last_error = f"{type(exc).__name__}: {exc}"
        self.stats.last_error_at = time.time()
        # Either way the relay reconnects and tries again: nothing is lost while rows wait. A
        # server that does not answer is expected; anything else is a bug, so its traceback.
        if is_transient(exc):
            log.warning("relay: %s; retrying", self.stats.error)
        else:
            log.error("relay: %s; retrying", self.stats.error, exc_info=exc)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _run_once(self) -> None:
        conn = await asyncpg.connect(self.settings.asyncpg_dsn_for(WORKER))
        self.stats.connected = True
        try:
            await conn.execute("SELECT pg_advisory_lock($1, pg_backend_pid())", MEMBER_LOCK)
            await conn.add_listener(CHANNEL, lambda *_: self._wakeup.set())
            await conn.add_listener(RELAYS_CHANNEL, lambda *_: self._membership_changed())
            await conn.execute("SELECT pg_notify($1, '')", RELAYS_CHANNEL)  # the others make room now
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.bootstrap_servers,
                acks="all",
                linger_ms=0,
                max_batch_size=1 << 20,
                request_timeout_ms=15000,
                retry_backoff_ms=100,
            )
            await producer.start()
            try:
                await ensure_topics(self.settings, [*self.topics, RELAY_DLQ_TOPIC])
                self.stats.error = ""  # the database and the broker answer again
                await self._relay(conn, producer)
                # Stopping: leave, and tell the others to take the shards now (a relay that
                # dies instead is noticed at their next balance).
                await conn.execute("SELECT pg_advisory_unlock_all()")
                await conn.execute("SELECT pg_notify($1, '')", RELAYS_CHANNEL)
            finally:
                self._held([])
                await producer.stop()
        finally:
            self.stats.connected = False
            # Closing the session releases every lock it holds: the shards go to the others.
            await conn.close(timeout=2)

    def _membership_changed(self) -> None:
        self._rebalance.set()
        self._wakeup.set()

    def _held(self, shards: list[int]) -> None:
        was = self.stats.shards
        self.stats.shards = tuple(sorted(shards))
        self.stats.active = bool(shards)
        if self.stats.shards != was:
            log.info("relay shards: %s", ",".join(map(str, self.stats.shards)) or "none (standby)")

    async def _balance(self, conn: asyncpg.Connection, held: list[int]) -> list[int]:
        """Hold this relay's fair share of the shards: give extras back, take free ones.

        Called between batches only: every row of a shard given back was published and its
        delete committed, so the next owner starts at the shard's oldest unpublished row.
        """
        live = max(1, await conn.fetchval(LOCK_HOLDERS, MEMBER_LOCK))
        fair = -(-self._shard_count // live)
        held = list(held)
        if len(held) > fair:
            while len(held) > fair:
                await conn.fetchval("SELECT pg_advisory_unlock($1, $2)", RELAY_LOCK, held.pop())
            await conn.execute("SELECT pg_notify($1, '')", RELAYS_CHANNEL)  # freed: the others take them now
        for shard in range(self._shard_count):
            if len(held) >= fair:
                break
            if shard not in held and await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", RELAY_LOCK, shard):
                held.append(shard)
        self._held(held)
        return held

    async def _relay(self, conn: asyncpg.Connection, producer: AIOKafkaProducer) -> None:
        lag_checked = balanced = 0.0
        held: list[int] = []
        while not self._stopping.is_set():
            now = time.monotonic()
            if now - balanced >= self._standby_poll or self._rebalance.is_set():
                self._rebalance.clear()
                held = await self._balance(conn, held)
                balanced = now
            if not held:
                # Standby: the other relays hold every shard, until one joins, leaves or gives some back.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._rebalance.wait(), self._standby_poll)
                continue
            self._wakeup.clear()
            rows = await conn.fetch(_FETCH, self.settings.relay_batch, held)
            if rows:
                await self._publish(producer, rows)
                await conn.execute(_DELETE, [r["id"] for r in rows])
                self.stats.published += len(rows)
                self.stats.batches += 1
            if now - lag_checked > 1.0:
                count, oldest = await conn.fetchrow(LAG_SQL)
                self.stats.pending_rows, self.stats.oldest_seconds = count, float(oldest or 0.0)
                lag_checked = now
            if len(rows) < self.settings.relay_batch:
                # Caught up: sleep until a commit NOTIFYs, polling as a fallback.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), min(self.settings.relay_poll_interval,
                                                                    self._standby_poll))
                if rows:
                    # Busy: the next batch starts `relay_linger_ms` after this one at the
                    # earliest, so commits arriving meanwhile go out together. A commit after a
                    # quiet spell is published at once. Each batch is a record batch per
                    # partition, and Tansu lists every batch of a partition on each fetch of it:
                    # one per commit made every reader of the topic slower as it grew.
                    left = self.settings.relay_linger_ms / 1000 - (time.monotonic() - now)
                    if left > 0:
                        await asyncio.sleep(left)

    async def _publish(self, producer: AIOKafkaProducer, rows: list[asyncpg.Record]) -> None:
        """Send every message of `rows`, in order per partition, and wait for every ack.

        Messages go out as one record batch per topic-partition (aiokafka's batch API): the
        per-message `send()` path costs more than encoding the event itself.
        """
        messages: list[Outgoing] = []
        for row in rows:
            try:
                messages.extend(to_messages(row, self.dual.get(row["topic"], ())))
            except Exception as exc:  # bad data must not block the outbox behind it
                messages.append(dead_letter(row, exc))
                self.stats.dead_lettered += 1
                log.error("outbox row %s dead-lettered: %s", row["id"], exc)
        partitions: dict[str, list[int]] = {}
        builders: dict[tuple[str, int], Any] = {}
        futures = []
        for m in messages:
            if m.topic not in partitions:
                partitions[m.topic] = sorted(await producer.partitions_for(m.topic))
            tp = (m.topic, _PARTITIONER(m.key, partitions[m.topic], partitions[m.topic]))
            builder = builders.get(tp)
            if builder is None:
                builder = builders[tp] = producer.create_batch()
            if builder.append(key=m.key, value=m.value, timestamp=None, headers=m.headers) is None:
                # Full: send it (batches of one partition go out in order) and start another.
                futures.append(await producer.send_batch(builder, tp[0], partition=tp[1]))
                builder = builders[tp] = producer.create_batch()
                builder.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
        for (topic, partition), builder in builders.items():
            futures.append(await producer.send_batch(builder, topic, partition=partition))
        await asyncio.gather(*futures)

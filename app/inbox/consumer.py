"""The transactional inbox: a consumer of our topics that applies each event exactly once.

For each batch it reads, one database transaction claims the batch's event ids in `inbox`
(`INSERT ... ON CONFLICT DO NOTHING`: an id already there was applied before and is skipped),
locks the batch's keys in `inbox_keys` and skips events at or below the last sequence applied
for their key (older than the state already applied), runs the service's handler for the rest
with the transaction's session, and records the new sequences. Only once that transaction has
committed are the Kafka offsets committed. So a crash anywhere applies nothing twice: before
the commit nothing happened; after it, the redelivered events find their inbox rows.

The handler's writes go through the evented ORM in the same transaction, so the events they
raise are in the outbox exactly when the inbox rows are: consume -> write -> publish, atomic.

Failures, each counted:
- an event that does not decode is dead-lettered at once (it never will);
- a handler error rolls the batch back; its events are then applied one per transaction, each
  retried with backoff up to `max_attempts` times, then dead-lettered to
  `<topic>.<consumer>.dlq` in the one dead-letter format (`app.wire.deadletter`), and the
  consumer goes on. A dead-lettered event leaves no inbox row, so a redrive applies it (if no
  newer event of its key was applied meanwhile);
- the database or the broker unreachable is retried with backoff forever: nothing valid is
  dead-lettered for an outage.
A gap in a key's sequence (an event missing between two applied ones) is counted and logged;
with `strict_order` it is a handler error instead (retried, then dead-lettered).

Over 300 lines on purpose: the claim, the sequence checks, the commit order, the retries and
the dead letters make one exactly-once argument, and are checked by reading them together.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import EventsError, is_transient
from app.inbox import store
from app.inbox.events import InboxEvent, to_event
from app.kafka import TopicError, adapt_fetch_wait, ensure_topics, topic_partitions
from app.orm import Database
from app.retries import Backoff
from app.settings import Settings
from app.topology import inbox_dead_letter_topic
from app.wire.deadletter import dead_letter
from app.wire.messages import Incoming, schema_for_topic
from app.wire.schemas import EventSchema

log = logging.getLogger(__name__)

Handler = Callable[[AsyncSession, InboxEvent], Awaitable[None]]
#: A handler given every event of a transaction to apply, in order, at once: it can read and
#: write them with a few statements instead of a few per event.
BatchHandler = Callable[[AsyncSession, list[InboxEvent]], Awaitable[None]]


class SequenceGap(EventsError):
    """With `strict_order`: an event whose key skipped a sequence number."""


class _Stopped(BaseException):
    """`stop()` was called while waiting out an outage: leave without committing more.

    A BaseException, so the handler-error paths (`except Exception`) never take it for a
    failing event and dead-letter a valid one on the way out."""


@dataclass
class InboxStats:
    """What the consumer has done; exported as `mse_inbox_*` metrics."""

    applied: int = 0
    skipped_duplicate: int = 0
    skipped_old: int = 0
    gaps: int = 0
    dead_lettered: int = 0
    handler_errors: int = 0
    batches: int = 0
    #: Messages in the assigned partitions not committed yet, per "topic[partition]".
    lag: dict[str, int] = field(default_factory=dict)
    #: Whether the last attempt to reach the database and the broker succeeded.
    connected: bool = False
    #: What fails now ("" once the broker and the database answer again).
    error: str = ""
    #: The most recent error, kept after it cleared, and when it happened (Unix time; 0: never).
    last_error: str = ""
    last_error_at: float = 0.0


@dataclass
class _Outcome:
    """Counts of one committed transaction, added to the stats only once it committed."""

    applied: int = 0
    duplicates: int = 0
    old: int = 0
    gaps: int = 0


class Inbox:
    """Consumes `topics` as `name` and applies each event once with `handler`.

    `name` is the consumer (its Kafka group and its inbox rows); it must be the service's name
    or start with `<service>.`, as the service's role may only touch those inbox rows.
    `handler(session, event)` is called once per event to apply; `batch_handler(session,
    events)` instead once per transaction with all of them, in order.
    """

    def __init__(self, settings: Settings, db: Database, name: str, topics: Sequence[str],
                 handler: Handler | None = None, *, batch_handler: BatchHandler | None = None,
                 batch: int | None = None, strict_order: bool = False,
                 max_attempts: int | None = None, retention: float | None = None,
                 schema_of: Callable[[str], EventSchema] = schema_for_topic) -> None:
        self.settings = settings
        self.db = db
        self.name = name
        self.topics = list(topics)
        if (handler is None) == (batch_handler is None):
            raise ValueError("give an Inbox exactly one of handler and batch_handler")
        self.handler = handler
        self.batch_handler = batch_handler
        #: Events per transaction; 1 when the handler must see one event per transaction.
        self.batch = max(1, batch if batch is not None else settings.inbox_batch)
        self.strict_order = strict_order
        self.max_attempts = max_attempts if max_attempts is not None else settings.inbox_max_attempts
        self.retention = retention if retention is not None else settings.inbox_retention_s
        #: topic -> the schema its messages are decoded with (default: from `<entity>-v<N>`).
        self.schema_of = schema_of
        self.stats = InboxStats()
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._tps: list[TopicPartition] = []

    def stop(self) -> None:
        """Ask `run` to return after the batch in hand."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until `stop`; reconnects with backoff after broker failures."""
        backoff = Backoff(0.1, 5.0)
        while not self._stopping.is_set():
            try:
                await self._start()
                backoff.reset()
                await self._consume()
            except _Stopped:
                return
            except (KafkaError, TopicError, OSError) as exc:
                self._failed("broker", exc)
                await self._sleep(backoff.next())
            finally:
                await self._close()

    async def _start(self) -> None:
        bootstrap = self.settings.bootstrap_servers
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=self.name, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=self.settings.consumer_fetch_max_wait_ms)
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await self._consumer.start()
        await self._producer.start()
        await ensure_topics(self.settings, [inbox_dead_letter_topic(t, self.name) for t in self.topics])
        # Manual assignment, positions from the group's committed offsets: a restarted
        # consumer resumes at once instead of waiting out its dead self's group session.
        self._tps = [tp for topic in self.topics for tp in await topic_partitions(self._consumer, topic)]
        self._consumer.assign(self._tps)
        for tp in self._tps:
            committed = await self._consumer.committed(tp)
            if committed is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, committed)

    async def _close(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._consumer = self._producer = None

    async def _consume(self) -> None:
        assert self._consumer is not None
        last_prune = 0.0
        loop = asyncio.get_running_loop()
        committing: asyncio.Future[None] | None = None
        try:
            while not self._stopping.is_set():
                # A consumer catching up on a deep partition needs Tansu's long fetch wait.
                adapt_fetch_wait(self._consumer, self.settings.consumer_fetch_max_wait_ms,
                                 self.settings.consumer_catchup_fetch_wait_ms)
                fetched = await self._consumer.getmany(*self._tps, timeout_ms=200, max_records=self.batch)
                records = [r for tp in sorted(fetched) for r in fetched[tp]]
                if records:
                    await self._handle(records)
                    # After the database commit and in order, but the next batch does not wait
                    # for the broker's answer: a crash before it lands only redelivers events
                    # the inbox already holds.
                    if committing is not None:
                        await committing
                    committing = asyncio.ensure_future(self._consumer.commit(
                        {tp: rs[-1].offset + 1 for tp, rs in fetched.items() if rs}))
                    self.stats.batches += 1
                self.stats.connected = True
                self.stats.error = ""  # a fetch and the batch's transaction went through
                await self._update_lag()
                if loop.time() - last_prune > self.settings.inbox_prune_interval_s:
                    last_prune = loop.time()
                    await self._prune()
        finally:
            if committing is not None:
                await asyncio.gather(committing, return_exceptions=True)

    async def _handle(self, records: list[ConsumerRecord]) -> None:
        """Apply a fetched batch; returns once every record is applied, skipped or dead-lettered."""
        events: list[InboxEvent] = []
        for record in records:
            try:
                events.append(to_event(record, self.schema_of))
            except Exception as exc:  # poison: it will never decode, so it goes at once
                await self._dead_letter(record, exc)
        if len(events) > 1:
            try:
                await self._until_reachable(events)
                return
            except Exception as exc:  # a handler error: find the culprit, one event per transaction
                self.stats.handler_errors += 1
                log.warning("inbox %s: a batch of %d failed (%r); applying them one by one",
                            self.name, len(events), exc)
        for event in events:
            await self._one(event)

    async def _one(self, event: InboxEvent) -> None:
        """Apply one event in its own transaction: bounded attempts, then its dead letter."""
        backoff = Backoff(0.05, 2.0)
        for attempt in range(1, self.max_attempts + 1):
            try:
                await self._until_reachable([event])
                return
            except Exception as exc:
                self.stats.handler_errors += 1
                log.warning("inbox %s: %s[%d]@%d failed (attempt %d of %d): %r", self.name, event.topic,
                            event.partition, event.offset, attempt, self.max_attempts, exc)
                if attempt == self.max_attempts:
                    await self._dead_letter(event.message, exc)
                    return
                await self._sleep(backoff.next())

    async def _until_reachable(self, events: list[InboxEvent]) -> None:
        """`_transaction(events)`, retried with backoff for as long as the database is
        unreachable (an outage dead-letters nothing); a handler error is raised."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await self._transaction(events)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._failed("database", exc)
                await self._sleep(backoff.next())
                if self._stopping.is_set():
                    raise _Stopped from exc

    async def _transaction(self, events: list[InboxEvent]) -> None:
        """Claim, check sequences, run the handler and record sequences, in one transaction."""
        outcome = _Outcome()
        async with self.db.session() as session:
            conn = await session.connection()
            keyed = sorted({(e.entity, e.key) for e in events if e.sequenced})
            rows: Sequence[Any] = (await conn.exec_driver_sql(store.CLAIM_AND_LOCK, (
                self.name, [e.event_id for e in events], [e.topic for e in events],
                [e.partition for e in events], [e.offset for e in events],
                [k[0] for k in keyed], [k[1] for k in keyed]))).all()
            new = {row[1] for row in rows if row[0] == "claimed"}
            last: dict[tuple[str, str], int] = {(row[1], row[2]): row[3] for row in rows if row[0] == "key"}
            fresh, seen = [], set()
            for e in events:
                if e.event_id in new and e.event_id not in seen:
                    seen.add(e.event_id)
                    fresh.append(e)
            outcome.duplicates = len(events) - len(fresh)
            changed: dict[tuple[str, str], int] = {}
            apply: list[InboxEvent] = []
            for e in fresh:
                key = (e.entity, e.key)
                previous = last.get(key) if e.sequenced else None
                if previous is not None and e.sequence <= previous:
                    outcome.old += 1
                    continue
                if previous is not None and e.sequence > previous + 1:
                    if self.strict_order:
                        raise SequenceGap(f"{e.entity} {e.key}: sequence {e.sequence} follows "
                                          f"{previous}; strict order refuses the gap")
                    outcome.gaps += 1
                    log.warning("inbox %s: %s %s jumped from sequence %d to %d (%s[%d]@%d)", self.name,
                                e.entity, e.key, previous, e.sequence, e.topic, e.partition, e.offset)
                apply.append(e)
                if e.sequenced:
                    last[key] = changed[key] = e.sequence
            if self.batch_handler is not None:
                if apply:
                    await self.batch_handler(session, apply)
            else:
                assert self.handler is not None
                for e in apply:
                    await self.handler(session, e)
            outcome.applied = len(apply)
            if changed:
                await conn.exec_driver_sql(store.SAVE_SEQUENCES, (
                    self.name, [k[0] for k in changed], [k[1] for k in changed], list(changed.values())))
        self.stats.applied += outcome.applied
        self.stats.skipped_duplicate += outcome.duplicates
        self.stats.skipped_old += outcome.old
        self.stats.gaps += outcome.gaps

    async def _dead_letter(self, record: ConsumerRecord, exc: BaseException) -> None:
        """Send the message, untouched, to this consumer's dead-letter topic; wait for the ack."""
        letter = dead_letter(record.topic, Incoming(record.key, record.value, record.partition, record.offset,
                                                    list(record.headers or ())), exc,
                             to=inbox_dead_letter_topic(record.topic, self.name))
        assert self._producer is not None
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await self._producer.send_and_wait(letter.topic, letter.value, key=letter.key,
                                                   headers=letter.headers)
                break
            except KafkaError as err:
                self._failed("broker", err)
                await self._sleep(backoff.next())
                if self._stopping.is_set():
                    raise _Stopped from err
        self.stats.dead_lettered += 1
        log.error("inbox %s: %s[%d]@%d dead-lettered to %s: %r", self.name, record.topic, record.partition,
                  record.offset, letter.topic, exc)

    async def _prune(self) -> None:
        """Forget event ids older than the retention (best effort: retried next interval)."""
        try:
            async with self.db.engine.begin() as conn:
                await conn.exec_driver_sql(store.PRUNE, (self.name, float(self.retention)))
        except Exception as exc:
            log.warning("inbox %s: pruning failed: %r", self.name, exc)

    async def _update_lag(self) -> None:
        """Messages not consumed yet per partition: the high watermark of the last fetch minus
        the position (everything before it is applied and committed)."""
        assert self._consumer is not None
        lag = {}
        for tp in self._tps:
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                lag[f"{tp.topic}[{tp.partition}]"] = max(0, highwater - await self._consumer.position(tp))
        self.stats.lag = lag

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.connected = False
        self.stats.error = self.stats.last_error = f"{what}: {type(exc).__name__}: {exc}"[:300]
        self.stats.last_error_at = time.time()
        log.warning("inbox %s: %s unavailable, retrying: %r", self.name, what, exc)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

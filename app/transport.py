"""A Faust Kafka transport whose worker consumers use our fetch wait and true end offsets.

Faust hard-codes `fetch_max_wait_ms=1500` for worker consumers. Apache Kafka answers a
waiting fetch as soon as data arrives, so there it only bounds idle polling; Tansu answers
only when the wait expires, so there it is the latency of every hop. The setting
`consumer_fetch_max_wait_ms` replaces it. The end offsets Faust recovers tables up to are
corrected with a fetch (Tansu's are short by up to a batch). Everything else is Faust's
own driver.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiokafka
import faust
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from faust.transport.consumer import ensure_TP
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from mode.services import WaitResults

from app.commits import CommitGuard
from app.eager import start_eagerly
from app.faust_compat import check_coordinator_errors, forget_unacked, replace_read_offsets, set_fetch_max_wait
from app.kafka import adapt_fetch_wait, fetched_end_offsets
from app.retries import Retries
from app.settings import Settings
from app.web.http import Limits, guard

log = logging.getLogger(__name__)


class FetchWaitConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the fetch wait taken from the app's settings."""

    consumer: FetchWaitConsumer  # the one that made it (`_new_consumer_thread`): it keeps the seek epoch

    def _create_worker_consumer(self, transport: driver.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        wait = getattr(self.app, "settings", None)
        if wait is not None:
            set_fetch_max_wait(consumer, wait.consumer_fetch_max_wait_ms)
        return consumer


    async def _fetch_records(self, consumer: aiokafka.AIOKafkaConsumer, active_partitions: set[TP],
                             timeout: float | None = None, max_records: int | None = None) -> Any:
        # Faust reads aiokafka's fetcher directly, skipping the coordinator check that
        # `AIOKafkaConsumer.getmany` makes: an error the coordinator pushes to the user (a
        # failed offset fetch, a heartbeat error) parks its routine until someone reads it,
        # which nobody did, and the partitions it was resetting were never fetched again.
        # Read, logged and released here; one that ended a task for good is the liveness
        # rule's (app/ops/liveness.py).
        try:
            check_coordinator_errors(consumer)
        except KafkaError as exc:
            log.warning("consumer: the group coordinator reported %r; it carries on", exc)
        settings: Settings | None = getattr(self.app, "settings", None)
        if settings is not None:
            adapt_fetch_wait(consumer, settings.consumer_fetch_max_wait_ms, settings.consumer_catchup_fetch_wait_ms)
        records = await super()._fetch_records(consumer, active_partitions, timeout=timeout,
                                               max_records=max_records)
        # Read in the step that drained the records (a return is not a yield to the loop): a
        # seek, which runs on this loop too (`seek_marked`), came either before the drain, so
        # the records are from the sought position, or after, so they are older than it.
        return Fetched(records, self.consumer.seek_epoch)

    async def seek_marked(self, tp: TP, offset: int) -> None:
        """Seek `tp` to `offset`, noting the seek in the same step (see `Fetched`)."""
        self.consumer.mark_sought(ensure_TP(tp))
        self._ensure_consumer().seek(tp, offset)

    async def seek_to_committed_marked(self) -> dict[TP, int | None]:
        """aiokafka's `seek_to_committed` for every assigned partition, each seek noted in the
        step it is made (a fetch may be drained between two partitions' seeks)."""
        consumer = self._ensure_consumer()
        committed: dict[TP, int | None] = {}
        for tp in list(consumer.assignment()):
            offset = await consumer.committed(tp)
            committed[ensure_TP(tp)] = offset
            if offset is not None and offset > 0:  # as aiokafka: 0 and None are not sought
                self.consumer.mark_sought(ensure_TP(tp))
                consumer.seek(tp, offset)
        return committed

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        # Faust ends table recovery at these offsets. Tansu's answer is the start of the last
        # record batch, so recovery stopped short and a table could miss the changelog's
        # last writes for good (the fault-injection suite saw an aggregate one off after a
        # takeover): correct it with a fetch (app.kafka.fetched_end_offsets).
        reported = await super()._highwaters(partitions)
        settings: Settings | None = getattr(self.app, "settings", None)
        if settings is None or self.consumer.in_transaction:
            return reported
        by_kafka_tp = {TopicPartition(tp.topic, tp.partition): tp for tp in reported}
        ends = await fetched_end_offsets(settings.bootstrap_servers,
                                         {k: reported[tp] for k, tp in by_kafka_tp.items()})
        return {by_kafka_tp[k]: end for k, end in ends.items()}


class Fetched(dict[Any, Any]):
    """Records of one fetch, with the consumer's seek count when they were drained."""

    def __init__(self, records: Mapping[Any, Any], epoch: int) -> None:
        super().__init__(records)
        self.epoch = epoch


class _ReadOffsets(defaultdict[TP, "int | None"]):
    """`Consumer._read_offset`, refusing the write for a message a seek overtook.

    Faust's drain loop hands a fetched message to the streams (`await callback(message)`) and
    then records its offset as read, below which it drops fetched messages as already read. A
    seek can run while it waits (a rebalance's, or one cut short by `suspend_flow`, which
    cancels the delivery): the consumer goes back to the committed offset and resets the read
    offsets, and then the loop records the old message's offset, higher than that. Every
    message fetched again between the two then counted as read, never processed (the storm
    chaos test lost `orders-v1` events and views that way). The write is refused when the
    message was fetched in an earlier generation or before its partition was last sought.
    """

    def __init__(self, consumer: "FetchWaitConsumer") -> None:
        super().__init__(lambda: None)
        self._consumer = consumer

    def __setitem__(self, tp: TP, offset: "int | None") -> None:
        consumer = self._consumer
        message = consumer.delivering
        if (message is not None and offset is not None and message.tp == tp and message.offset == offset
                and (message.generation_id != consumer.app.consumer_generation_id
                     or consumer.sought.get(tp, 0) > consumer.delivering_epoch)):
            return
        super().__setitem__(tp, offset)

    def reset(self, tp: TP, offset: "int | None") -> None:
        """Set the read offset after a seek, never refused."""
        super().__setitem__(tp, offset)


class FetchWaitConsumer(driver.Consumer):
    """Faust's aiokafka consumer using `FetchWaitConsumerThread`, recording only real acks and
    the read offsets of delivered messages, and committing only processed offsets
    (`app.commits`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._thread: FetchWaitConsumerThread  # made by `_new_consumer_thread`, below
        #: The message the drain loop is handing to the streams now (see `_ReadOffsets`).
        self.delivering: Message | None = None
        #: Seeks so far (counted on the consumer thread, in the step each seek is made); per
        #: partition, the count at its last seek; the count when the batch being delivered
        #: was drained, and when `delivering` was.
        self.seek_epoch = 0
        self.sought: dict[TP, int] = {}
        self.batch_epoch = 0
        self.delivering_epoch = 0
        #: Where each input partition's next commit must start, and what the rule held back.
        self.commit_guard: CommitGuard[TP] = CommitGuard()
        self.read_offsets = _ReadOffsets(self)
        replace_read_offsets(self, self.read_offsets)
        deliver = self.callback

        def callback(message: Message) -> Any:
            # Plain function: the message is noted before the drain loop awaits its delivery,
            # which starts now (app/eager.py): almost always it is done by the time the drain
            # loop gets it, and `wait_first` (below) then needs no Task and no loop iteration.
            self.delivering = message
            self.delivering_epoch = self.batch_epoch
            delivery = deliver(message)
            return start_eagerly(delivery) if asyncio.iscoroutine(delivery) else delivery

        self.callback = callback

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        # The drain loop races each delivery against `suspend_flow` (a rebalance cancels a
        # delivery that waits). One that is done already has won: the race would cost four
        # Tasks and three loop iterations per message (app/eager.py says why that matters).
        first = coros[0] if coros else None
        if isinstance(first, asyncio.Future) and first.done() and not self.should_stop:
            for other in coros[1:]:
                if asyncio.iscoroutine(other):
                    other.close()  # the `suspend_flow.wait()` nobody needs
            return WaitResults([first], [first.result()], False)
        return await super().wait_first(*coros, timeout=timeout)

    def ack(self, message: Message) -> bool:
        # While a rebalance is under way (flow control suspended) or once it has happened
        # (the message's generation is not the consumer's), Faust's streams skip the messages
        # still queued for them and ack them unprocessed. Recorded, such an ack lets the commit
        # Faust makes as the partitions are revoked move past a message that one agent never
        # handled: the fault-injection suite saw down-converted events lost that way after a
        # takeover. Not recorded, the message is read again after the rebalance, as Faust
        # intends: at least once.
        if (not self.app.flow_control.is_active()
                or message.generation_id != self.app.consumer_generation_id):
            with ack_lock:
                message.acked = True
                forget_unacked(self, message)
            return False
        return super().ack(message)

    def _new_offset(self, tp: TP) -> int | None:
        # Faust's rule commits past one missing offset and, with no committed base, past any
        # (faust-streaming#606): ours only ever commits a run that starts at the base.
        return self.commit_guard.next_commit(tp, self._acked[tp], self._acked_index[tp], time.monotonic(),
                                             known_committed=self._committed_offset.get(tp))

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # Faust counts the offsets a delivery jumped over (and the delivered one) as done. Our
        # input topics are neither compacted nor transactional, so their offsets are contiguous
        # and a jump means messages were skipped: filled, they would be committed unprocessed.
        self.commit_guard.offset_jumps[tp] += 1
        log.warning("consumer: %s jumped from offset %d to %d: not counted as processed; the commit "
                    "holds at %s until they are", tp, offset_from - 1, offset_to,
                    self.commit_guard.base.get(tp))

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self.commit_guard.forget(revoked)
        await super().on_partitions_revoked(revoked)

    def on_buffer_drop(self, tp: TP) -> None:
        # A pressure-drop callback left over from before a rebalance (the queue clear keeps
        # them) would make a partition paused for recovery active again.
        if tp not in self._paused_partitions:
            super().on_buffer_drop(tp)

    async def perform_seek(self) -> None:
        """Seek every assigned partition to its committed offset, with the flow stopped.

        Faust's recovery resumes the stream partitions while the flow is active, then seeks,
        then clears every agent queue (`flow_control.resume()`), then resumes the flow: a
        message the drain loop delivered after the seek was recorded as read and then
        cleared, and the drain loop never delivered it again. Stopped here, the flow resumes
        only after the queue clear (every caller of `perform_seek` calls `resume_flow` after).
        """
        self.stop_flow()
        committed = await self.seek_to_committed()
        self._read_offset.update({tp: offset if offset is not None and offset >= 0 else None
                                  for tp, offset in committed.items()})
        self._committed_offset.update({ensure_TP(tp): offset if offset else None
                                       for tp, offset in committed.items() if offset is not None})
        acking = self.app.topics.acks_enabled_for
        inputs = {ensure_TP(tp): offset for tp, offset in committed.items() if acking(tp.topic)}
        # aiokafka seeks only to a committed offset above 0 (`seek_to_committed`): a partition
        # with none is left where the fetcher is, past what it fetched while the flow was
        # stopped. Seek those to where a new group starts reading.
        unset = [tp for tp, offset in inputs.items() if not offset or offset < 0]
        if unset:
            starts = await self._reset_offsets(unset)
            for tp in unset:
                await self.seek(tp, starts[tp])
                inputs[tp] = starts[tp]
        for tp, offset in inputs.items():
            self.commit_guard.start_at(tp, offset)

    async def _reset_offsets(self, tps: list[TP]) -> Mapping[TP, int]:
        """Where a partition with no committed offset starts (`consumer_auto_offset_reset`)."""
        if self.app.conf.consumer_auto_offset_reset == "latest":
            return await self.highwaters(*tps)
        return await self.earliest_offsets(*tps)

    def mark_sought(self, tp: TP) -> None:
        """Note a seek of `tp`; call it on the consumer thread, in the step of the seek."""
        self.seek_epoch += 1
        self.sought[tp] = self.seek_epoch

    async def seek_to_committed(self) -> Mapping[TP, int]:
        return await self._thread.call_thread(self._thread.seek_to_committed_marked)

    async def _seek(self, partition: TP, offset: int) -> None:
        # Faust seeks from this thread while the consumer thread may be draining a fetch:
        # made there, the seek and the drain are ordered (see `Fetched`).
        await self._thread.call_thread(self._thread.seek_marked, partition, offset)

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        records, active = await super()._wait_next_records(timeout)
        self.batch_epoch = getattr(records, "epoch", self.seek_epoch)
        return records, active

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        # Faust's loop goes on through a batch fetched before a seek once the flow is active
        # again: those messages would be delivered, and recorded as read, ahead of the ones
        # the seek reads again. They are left; the fetcher is at the sought position.
        async for tp, message in super().getmany(timeout):
            if self.sought.get(tp, 0) <= self.batch_epoch:
                yield tp, message

    async def seek(self, partition: TP, offset: int) -> None:
        # Faust's, with a write to the read offsets that is never refused (the message being
        # delivered may have this very offset).
        await self._seek(partition, offset)
        self.read_offsets.reset(ensure_TP(partition), offset if offset else None)
        if self.app.topics.acks_enabled_for(partition.topic):
            self.commit_guard.start_at(ensure_TP(partition), offset)

    async def reseek_held(self, older_than: float) -> list[TP]:
        """Seek back to its base each partition whose commit has been held `older_than` s.

        A hole at the head of the acked offsets with processed ones above it is a message no
        agent finished: every agent of a topic handles its partitions in order, so an offset
        above it could not have been acked by all of them otherwise. It was dropped (an actor
        restarted, a queue cleared); read again, it is processed (at least once: the stages
        are idempotent).
        """
        now = time.monotonic()
        guard = self.commit_guard
        assigned = self.assignment()
        held = [tp for tp, since in guard.held_since.items()
                if now - since >= older_than and tp in assigned and tp in guard.base]
        if not held or not self.flow_active or self.app.rebalancing:
            return []
        for tp in held:
            log.warning("consumer: %s: offset %d was never processed while later ones were "
                        "(acked from %s); reading again from %d", tp, guard.base[tp],
                        min(self._acked[tp], default=None), guard.base[tp])
            guard.reseeks += 1
            # Marked as sought: what the drain loop holds of the partition's older fetch is
            # left, and its read offset goes back to the base (`_ReadOffsets`).
            await self.seek(tp, guard.base[tp])
        return held

    def _new_consumer_thread(self) -> FetchWaitConsumerThread:
        return FetchWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)


class FetchWaitTransport(driver.Transport):
    """Faust's aiokafka transport with `FetchWaitConsumer`."""

    Consumer = FetchWaitConsumer


class DirectTopic(faust.Topic):
    """Faust's Topic, without three trips through the event loop for every message sent.

    `Topic.publish_message` fetches the producer through `App.maybe_start_producer`, a mode
    `stampede` that awaits `asyncio.sleep(0)` three times per call. On a busy worker each of
    those waits a whole loop cycle (~1-2 ms on 2 cores): a stage-1 batch spent ~40 ms sending
    ~20 repartition messages, and Faust's producer buffer, which sends the tables' changelog
    messages one at a time, drained one message per cycle and throttled every agent. Once the
    producer runs, it is returned as is.
    """

    async def _get_producer(self) -> Any:
        producer = self.app.producer
        if producer.started and not self.app.in_transaction:
            return producer
        return await super()._get_producer()


class App(faust.App):
    """`faust.App` carrying our `Settings` and using `FetchWaitTransport`."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings.app_id, **kwargs)
        self.settings = settings
        #: Which agents are retrying a batch, since when (read by the watchdog).
        self.retries = Retries(log_interval=settings.stuck_after)

    def _new_transport(self) -> Any:
        return FetchWaitTransport(self.conf.broker_consumer, self)

    def _new_web(self) -> Any:
        # Faust's aiohttp driver, with one error format and bounded read times and connections.
        web = super()._new_web()
        s = self.settings
        guard(web, Limits(header_timeout=s.http_header_timeout, body_timeout=s.http_body_timeout,
                          max_connections=s.http_max_connections))
        return web

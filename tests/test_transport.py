"""The worker's consumer (app/transport.py, app/commits.py): a commit never passes an offset no
agent finished, a seek cannot interleave with delivery, and a fetched batch is delivered without
loop iterations per message (app/eager.py).

Each rule has a test that runs the same steps on Faust's stock consumer and shows what it does
there (commits past the missing message), so an upgrade that fixes Faust shows up here too.
No broker: the recovery-completion sequence is driven step by step with Faust's real drain loop
and `getmany`, over a scripted fetcher.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord
from faust.transport.drivers import aiokafka as driver
from faust.types import TP
from mode import Service

from app.commits import CommitGuard
from app.settings import Settings
from app.transport import App, Fetched, FetchWaitConsumer
from tests.waiting import until

TOPIC = "orders-v2"
T0 = TP(TOPIC, 0)


def guard_at(base: int | None) -> CommitGuard[str]:
    guard: CommitGuard[str] = CommitGuard()
    if base is not None:
        guard.start_at("tp", base)
    return guard


def test_a_commit_never_passes_an_offset_that_was_not_acked() -> None:
    # committed 10, acked [11, 12]: offset 10 was never processed (faust-streaming#606).
    acked = [11, 12]
    guard = guard_at(10)
    assert guard.next_commit("tp", acked, set(acked), now=0.0, known_committed=10) is None
    assert acked == [11, 12] and guard.held_since == {"tp": 0.0} and guard.commits_refused == 1
    acked.append(10)
    assert guard.next_commit("tp", acked, set(acked), now=1.0, known_committed=10) == 13
    assert acked == [] and guard.held_since == {} and guard.commits_past_unacked == 0


def test_a_commit_covers_only_the_run_that_starts_at_the_base() -> None:
    acked = [14, 12, 13, 10, 11, 20]
    guard = guard_at(10)
    assert guard.next_commit("tp", acked, set(acked), now=0.0) == 15
    assert acked == [20] and guard.base["tp"] == 15
    assert guard.next_commit("tp", acked, set(acked), now=0.0) is None  # 15..19 not acked


def test_nothing_is_committed_while_the_base_is_unknown() -> None:
    # After a revocation Faust has no committed offset, and its guard is off altogether.
    acked = [14, 15]
    guard = guard_at(None)
    assert guard.next_commit("tp", acked, set(acked), now=0.0, known_committed=None) is None
    assert guard.commits_refused == 1


def test_acks_below_the_base_are_messages_read_again_and_are_dropped() -> None:
    acked, index = [7, 8, 10], {7, 8, 10}
    guard = guard_at(10)
    assert guard.next_commit("tp", acked, index, now=0.0) == 11
    assert acked == [] and index == set()


@pytest.fixture
async def app() -> AsyncIterator[App]:
    # No broker is contacted: the consumer's fetches are scripted below.
    a = App(Settings(kafka_broker="kafka://127.0.0.1:1"), broker="kafka://127.0.0.1:1")
    yield a


def stock_new_offset(app: App, committed: int | None, acked: list[int]) -> int | None:
    consumer = driver.Consumer(app.transport, callback=lambda m: None, on_partitions_revoked=None,
                               on_partitions_assigned=None)
    consumer._committed_offset[T0] = committed
    consumer._acked[T0] = list(acked)
    return consumer._new_offset(T0)


async def test_stock_faust_commits_past_one_missing_offset(app: App) -> None:
    # The bug our rule fixes, shown on Faust itself: if this fails, Faust fixed #606.
    assert stock_new_offset(app, 10, [11, 12]) == 13
    assert stock_new_offset(app, None, [14, 15]) == 16


async def test_our_consumer_holds_the_commit_faust_would_make(app: App) -> None:
    consumer = app.consumer
    assert isinstance(consumer, FetchWaitConsumer)
    consumer._committed_offset[T0] = 10
    consumer.commit_guard.start_at(T0, 10)
    consumer._acked[T0] = [11, 12]
    assert consumer._new_offset(T0) is None
    consumer._acked[T0] = [10, 11, 12]
    assert consumer._new_offset(T0) == 13


class Recovery:
    """Faust's recovery-completion sequence around one partition, step by step.

    The log holds offsets 10..19, the group's committed offset is 10, and the fetcher is at 10
    (aiokafka resets an assigned partition to its committed offset). The drain loop (Faust's
    real `_drain_messages`, `getmany` and `_wait_next_records`) delivers into `queue`, an agent's queue: the agents
    do not run until the rebalance ends, as on a busy worker. Then, as `Recovery.
    on_recovery_completed` does: seek, clear every agent queue (`flow_control.resume()`),
    resume the flow; the agents process what is delivered after and ack it.
    """

    def __init__(self, consumer: Any, monkeypatch: pytest.MonkeyPatch, *, batch: int = 3, window: int = 2) -> None:
        self.consumer = consumer
        #: Records per fetch, and loop iterations between the seek and the queue clear.
        self.batch, self.window = batch, window
        self.app = consumer.app
        self.queue: list[Any] = []
        self.processed: list[int] = []
        self.position = 10
        self.fetched = asyncio.Event()
        monkeypatch.setattr(self.app.topics, "acks_enabled_for", lambda topic: topic == TOPIC)
        monkeypatch.setattr(consumer, "_getmany", self.fetch)
        monkeypatch.setattr(consumer, "seek_to_committed", self.seek_to_committed)
        monkeypatch.setattr(consumer, "_seek", self.seek)
        monkeypatch.setattr(consumer, "highwater", lambda tp: 20)
        monkeypatch.setattr(consumer, "assignment", lambda: {T0})
        monkeypatch.setattr(consumer, "_get_active_partitions", lambda: {T0})  # as after the assignment

    async def deliver(self, message: Any) -> None:
        self.queue.append(message)

    async def fetch(self, active_partitions: set[TP], timeout: float) -> Any:
        """The consumer thread's fetch: records from the position, drained in one step."""
        await asyncio.sleep(0)  # the fetch's round trip
        records = [ConsumerRecord(TOPIC, 0, offset, 0, 0, b"k", b"v", None, 1, 1, ())
                   for offset in range(self.position, min(self.position + self.batch, 20))]
        self.position += len(records)
        self.fetched.set()
        if isinstance(self.consumer, FetchWaitConsumer):
            return Fetched({T0: records}, self.consumer.seek_epoch)  # as FetchWaitConsumerThread
        return {T0: records}

    def move(self, offset: int) -> None:
        """aiokafka's seek, noted in the same step as our consumer thread does."""
        self.position = offset
        if isinstance(self.consumer, FetchWaitConsumer):
            self.consumer.mark_sought(T0)

    async def seek_to_committed(self) -> dict[TP, int]:
        await asyncio.sleep(0)  # OffsetFetch
        self.move(10)
        return {T0: 10}

    async def seek(self, tp: TP, offset: int) -> None:
        self.move(offset)

    async def run(self) -> int | None:
        """Run the sequence; the offset the consumer would commit at the end."""
        consumer, app = self.consumer, self.app
        fetcher = Service()
        consumer._committed_offset[T0] = 10
        drain = asyncio.ensure_future(consumer._drain_messages(fetcher))
        try:
            await self.fetched.wait()
            for _ in range(3):
                await asyncio.sleep(0)
            # on_recovery_completed: stream partitions resumed (flow active), then the seek,
            await consumer.perform_seek()
            for _ in range(self.window):  # the recovery task resumes a few loop iterations later
                await asyncio.sleep(0)
            # then every agent queue is cleared, then the flow resumes.
            app.flow_control.resume()
            self.queue.clear()
            consumer.resume_flow()
            for _ in range(200):  # the agents run: process and ack whatever is delivered now
                while self.queue:
                    message = self.queue.pop(0)
                    self.processed.append(message.offset)
                    consumer.ack(message)
                await asyncio.sleep(0)
        finally:
            await fetcher.stop()
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
        return consumer._filter_committable_offsets({T0}).get(T0)


@pytest.mark.parametrize("window", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
async def test_the_recovery_completion_sequence_delivers_every_message_again(
        app: App, monkeypatch: pytest.MonkeyPatch, batch: int, window: int) -> None:
    holder: dict[str, Recovery] = {}
    consumer = app.transport.create_consumer(callback=lambda m: holder["r"].deliver(m),
                                             on_partitions_revoked=None, on_partitions_assigned=None)
    holder["r"] = recovery = Recovery(consumer, monkeypatch, batch=batch, window=window)
    commit = await recovery.run()
    assert sorted(set(recovery.processed)) == list(range(10, 20)), recovery.processed
    assert commit == 20
    assert consumer.commit_guard.commits_past_unacked == 0


async def test_stock_faust_loses_a_message_in_the_recovery_completion_sequence(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same steps on Faust's own consumer: the rest of the batch fetched before the seek is
    # delivered after it and recorded as read, the queue clear drops it, the message at the
    # committed offset is then dropped as already read, and the commit moves past it: one
    # event lost, the first after the committed offset (the storm test's fingerprint).
    holder: dict[str, Recovery] = {}
    consumer = driver.Consumer(app.transport, callback=lambda m: holder["r"].deliver(m),
                               on_partitions_revoked=None, on_partitions_assigned=None)
    holder["r"] = recovery = Recovery(consumer, monkeypatch, batch=2, window=2)
    commit = await recovery.run()
    assert sorted(set(range(10, 20)) - set(recovery.processed)) == [10], recovery.processed
    assert commit == 20


async def drain_ticks(consumer: Any, monkeypatch: pytest.MonkeyPatch, delivered: list[int], count: int) -> int:
    """Loop iterations the real drain loop takes to deliver `count` fetched messages whose
    delivery never waits (as Faust's conductor: decode, `put_nowait`)."""
    fetched = {"done": False}

    async def fetch(active_partitions: set[TP], timeout: float) -> Any:
        await asyncio.sleep(0)
        if fetched["done"]:
            await asyncio.Event().wait()  # nothing more to read: the fetch waits until cancelled
        fetched["done"] = True
        records = [ConsumerRecord(TOPIC, 0, offset, 0, 0, b"k", b"v", None, 1, 1, ()) for offset in range(count)]
        return Fetched({T0: records}, 0) if isinstance(consumer, FetchWaitConsumer) else {T0: records}

    monkeypatch.setattr(consumer.app.topics, "acks_enabled_for", lambda topic: topic == TOPIC)
    monkeypatch.setattr(consumer, "_getmany", fetch)
    monkeypatch.setattr(consumer, "highwater", lambda tp: count)
    monkeypatch.setattr(consumer, "assignment", lambda: {T0})
    monkeypatch.setattr(consumer, "_get_active_partitions", lambda: {T0})
    fetcher = Service()
    drain = asyncio.ensure_future(consumer._drain_messages(fetcher))
    ticks = 0
    try:
        while len(delivered) < count and ticks < 100 * count:
            ticks += 1
            await asyncio.sleep(0)
    finally:
        await fetcher.stop()
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
    assert delivered == list(range(count))
    return ticks


async def test_the_drain_loop_delivers_a_fetched_batch_in_a_few_loop_iterations(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    # A busy worker's loop iteration takes tens of ms: at three per message, two workers caught
    # up on a backlog at ~16 messages/s each (app/eager.py).
    delivered: list[int] = []

    async def deliver(message: Any) -> None:
        delivered.append(message.offset)

    consumer = app.transport.create_consumer(callback=deliver, on_partitions_revoked=None,
                                             on_partitions_assigned=None)
    ticks = await drain_ticks(consumer, monkeypatch, delivered, 300)
    assert ticks <= 20, f"{ticks} loop iterations for 300 messages"


async def test_stock_faust_spends_loop_iterations_on_every_message_it_delivers(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same on Faust's own consumer: `wait_first` makes four Tasks per message. If this
    # fails, Faust delivers eagerly itself.
    delivered: list[int] = []

    async def deliver(message: Any) -> None:
        delivered.append(message.offset)

    consumer = driver.Consumer(app.transport, callback=deliver, on_partitions_revoked=None,
                               on_partitions_assigned=None)
    ticks = await drain_ticks(consumer, monkeypatch, delivered, 300)
    assert ticks >= 2 * 300, f"{ticks} loop iterations for 300 messages"


async def test_a_delivery_that_waits_is_still_cancelled_when_the_flow_is_suspended(app: App) -> None:
    # A rebalance suspends the flow: a delivery blocked on a full queue must give way, as in Faust.
    seen: list[str] = []

    async def blocked(message: Any) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    consumer = app.transport.create_consumer(callback=blocked, on_partitions_revoked=None,
                                             on_partitions_assigned=None)
    assert isinstance(consumer, FetchWaitConsumer)
    message = type("M", (), {"tp": T0, "offset": 1})()
    race = asyncio.ensure_future(consumer.wait_first(consumer.callback(message), consumer.suspend_flow.wait()))
    await asyncio.sleep(0)
    assert not race.done()
    consumer.suspend_flow.set()
    await asyncio.wait_for(race, 5)
    await until(lambda: seen, timeout=5, what="the waiting delivery cancelled")
    assert seen == ["cancelled"]

"""Batches in and out, for agents that process a batch at a time: `take_ready` takes the events
that are ready, `produce_all` sends a batch's output and waits for the broker to ack all of it
before the loop body returns and the batch is acked.

Faust's `Stream.take_events(n, within)` waits `within` seconds for every batch that is not full.
A short window keeps latency low but makes batches small under load, and each batch has a
fixed cost (sends, table writes, acks); a long window is latency added to every event. Measured
on the whole worker catching up on 20,000 orders (bench/catchup.py): 5 ms windows gave ~4
events per batch and ~300 events/s; 50 ms windows ~720 events/s.

`take_ready` yields as soon as the events already delivered to the stream are in the batch:
when the stream's queue is empty, or the batch is full. An event arriving alone is processed
at once; under a backlog, batches grow to what the consumer delivered (up to `max_`). This is
how Kafka Streams and Quix Streams batch: whatever the last poll returned. `within` only
bounds how long to wait when the queue never empties below a full batch.

It also acks a batch only once the loop body finished with it: Faust's `take_events` acks in a
`finally`, so a batch whose body raised or was cancelled was acked (and its offsets committed)
when the generator was closed.

And it drops, unacked, the events it holds when the worker's partitions are revoked, as Faust
clears every agent's queue then: after the rebalance the consumer seeks back to the committed
offsets and delivers them again. Yielded after the rebalance, they were acked ahead of the
re-read events before them, and Faust commits the first consecutive run of acked offsets, not
the run that starts at the committed offset: a worker killed before it re-processed the events
in between lost them (chaos: two workers started onto a backlog, an `orders-v1` event lost).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import faust
from faust.types import EventT, StreamT
from mode.utils.futures import notify

from app.faust_compat import drain_passively, passive_drainer_running, processors, remove_processor
from app.retries import retries_of
from app.wire.messages import Outgoing

#: Events per batch, and the shortest and longest window a batch waits to fill, for the
#: stream jobs: the short one bounds the latency a batch adds while the worker keeps up; under
#: a backlog the window grows, so batches coalesce more (bench/catchup.py on the whole worker:
#: 5 ms fixed ~300 events/s, 5-200 ms ~800 events/s, 5-500 ms no more).
BATCH = 1000
WITHIN = (0.005, 0.2)


def behind(stream: StreamT[Any], batch: list[EventT]) -> bool:
    """Whether more than a batch's worth of events waits behind `batch` in one of its partitions."""
    last: dict[Any, int] = {}
    for event in batch:
        message = event.message
        last[message.tp] = max(last.get(message.tp, -1), message.offset)
    consumer = stream.app.consumer
    for tp, offset in last.items():
        try:
            highwater = consumer.highwater(tp)
        except Exception:  # no consumer (an agent's test context): nothing is known to wait
            return False
        if highwater is not None and highwater - offset - 1 > len(batch):
            return True
    return False


def next_window(window: float, within: tuple[float, float], backlog: bool) -> float:
    """The window of the next batch: doubled (up to the longest) while a backlog waits behind the
    last batch, the shortest as soon as none does.

    Halving it instead, as this did before, left the end of a catch-up slow: from 200 ms the
    first live batches still waited 100, 50, 25 ... ms each, every live event behind them too
    (issue 31: a >1 s p99 at 200 commits/s right after a 20,000-order catch-up).
    """
    shortest, longest = within
    return min(longest, window * 2) if backlog else shortest


async def take_ready(stream: StreamT[Any], max_: int, within: tuple[float, float]
                     ) -> AsyncIterator[list[EventT]]:
    """Yield lists of up to `max_` events, each after a window of `within[0]`..`within[1]` s.

    The window doubles after a batch that left a backlog behind it and is back to the shortest
    after one that did not (`next_window`), so a worker that keeps up adds at most the short
    window to an event's latency, and one catching up makes batches large enough to coalesce.
    """
    shortest, longest = within
    window = shortest
    # (rebalance generation when the event reached this stream, event)
    events: list[tuple[int, EventT]] = []
    generation = 0

    async def revoked(sender: Any, revoked: Any, **_: Any) -> None:
        nonlocal generation
        generation += 1  # what this stream holds now is delivered again after the rebalance
    full = asyncio.Event()
    consumed = asyncio.Event()
    consuming: asyncio.Future[None] | None = None
    channel = aiter(stream.channel)

    def release() -> None:
        # Lets an `add` blocked on a full batch return, once this generator is abandoned.
        if consuming is not None:
            notify(consuming)
        consumed.set()

    async def add(value: Any) -> Any:
        # A stream processor: runs for each event in the stream's passive drainer task.
        nonlocal consuming
        born = generation
        if consuming is not None:
            try:
                await consuming  # the body is processing the last batch: hold this event
            finally:
                consuming = None
        event = stream.current_event
        if event is None:
            raise RuntimeError("take_ready: no current event")
        events.append((born, event))
        if len(events) >= max_:
            full.set()
            consumed.clear()
            # At most max_ per batch. (StreamT leaves out mode's Service methods; a Stream has them.)
            await stream.wait(consumed)  # type: ignore[attr-defined]  # StreamT leaves out mode's Service.wait
        return value

    add.release = release  # type: ignore[attr-defined]  # read by the next take_ready on this stream
    # A replaced actor gets the same stream, and its generator is closed only when garbage
    # collected: the old processor would keep filling a batch nobody reads, and block the
    # drainer (and with it every partition) once that batch is full. Its events are never acked:
    # read again (app/commits.py).
    for old in processors(stream):
        if hasattr(old, "release"):
            remove_processor(stream, old)
            old.release()
    stream.enable_acks = False  # acked below, once the body is done with the batch
    stream.add_processor(add)
    # mode's stub wants a `signal=` parameter; Faust passes it in **kwargs, which `revoked` takes.
    stream.app.on_partitions_revoked.connect(revoked)  # type: ignore[arg-type]  # mode's stub wants a signal= parameter
    drain_passively(stream, channel)  # as Faust's take_events: the stream is drained in the background
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(full, timeout=window)  # type: ignore[attr-defined]  # as `wait`
            if not passive_drainer_running(stream) and not stream.should_stop:
                # Faust throws the drainer's error into a channel nobody reads: without this the
                # agent would wait for events forever. Crashed, its supervisor replaces the actor.
                raise RuntimeError("take_ready: the stream's background drainer ended")
            full.clear()
            current = generation
            batch = [event for born, event in events if born == current]
            if not batch:
                events.clear()  # none, or only events from before a rebalance: delivered again
                consumed.set()
                window = shortest
                continue
            consuming = asyncio.get_running_loop().create_future()
            window = next_window(window, within, behind(stream, batch))
            try:
                yield batch
                # Only reached when the body asks for the next batch: it finished this one. After
                # a rebalance during the body, its events are delivered again: no ack.
                if generation == current:
                    for event in batch:
                        await stream.ack(event)
            finally:
                events.clear()
                notify(consuming)
                consumed.set()
    finally:
        remove_processor(stream, add)
        stream.app.on_partitions_revoked.disconnect(revoked)  # type: ignore[arg-type]  # as `connect`


async def produce_all(app: faust.App, messages: list[Outgoing], *, stage: str = "produce") -> None:
    """Send `messages` in order and wait for every ack, retrying until the broker takes them."""
    async def attempt() -> None:
        # Sent one after the other (each send only queues), then every ack awaited together.
        futures = [await app.producer.send(m.topic, m.key, m.value, m.partition, m.timestamp, m.headers)
                   for m in messages]
        await asyncio.gather(*futures)

    # The input is not acked until this is produced: never lose it.
    await retries_of(app).until_done(stage, attempt, first_backoff=0.1, max_backoff=5.0)

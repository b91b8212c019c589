"""take_ready (agents/batching.py): batch sizes, the adaptive window, and acks only after the body."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust

from agents.batching import behind, next_window, take_ready
from tests.waiting import until


def make_app(name: str) -> faust.App:
    # No broker is contacted: agents run in their test context.
    return faust.App(f"test-batching-{name}", store="memory://")


async def test_batches_hold_at_most_max_and_every_event_once_in_order() -> None:
    app = make_app("max")
    seen: list[list[bytes]] = []

    @app.agent(app.topic("in", value_serializer="raw"))
    async def agent(stream: Any) -> None:
        async for batch in take_ready(stream, 3, (0.001, 0.01)):
            seen.append([event.value for event in batch])

    async with agent.test_context() as ctx:
        for i in range(10):
            await ctx.put(b"%d" % i)
        await until(lambda: sum(map(len, seen)), lambda n: n == 10, timeout=5, what="10 events in batches")
    assert all(1 <= len(batch) <= 3 for batch in seen), seen
    assert [v for batch in seen for v in batch] == [b"%d" % i for i in range(10)]


async def test_a_batch_whose_body_raised_is_not_acked() -> None:
    app = make_app("acks")
    batches: list[list[Any]] = []

    @app.agent(app.topic("in", value_serializer="raw"))
    async def agent(stream: Any) -> None:
        async for batch in take_ready(stream, 100, (0.001, 0.01)):
            batches.append(batch)
            if any(event.value == b"boom" for event in batch):
                raise RuntimeError("the body failed on this batch")

    async with agent.test_context() as ctx:
        await ctx.put(b"ok")
        await until(lambda: len(batches), lambda n: n >= 1, timeout=5, what="the first batch")
        await ctx.put(b"boom")
        await until(lambda: any(e.value == b"boom" for b in batches for e in b), bool, timeout=5,
                    what="the failing batch")
    # Checked once the test context has stopped the agent: its batch generator is closed by
    # then, which is where Faust's take_events acks a batch whose body raised.
    first, failed = batches[0], [e for b in batches for e in b if e.value == b"boom"]
    assert all(event.message.acked for event in first), "a finished batch is acked"
    assert not any(event.message.acked for event in failed), "a batch whose body raised was acked"


async def test_events_held_when_partitions_are_revoked_are_dropped_unacked() -> None:
    app = make_app("revoked")
    seen: list[bytes] = []
    held: list[Any] = []

    @app.agent(app.topic("in", value_serializer="raw"))
    async def agent(stream: Any) -> None:
        async for batch in take_ready(stream, 100, (0.3, 0.3)):
            seen.extend(event.value for event in batch)

    async with agent.test_context() as ctx:
        for value in (b"a", b"b", b"c"):  # held in the batch being filled (a 300 ms window)
            held.append(await ctx.put(value))
        # The rebalance: the consumer seeks back to the committed offsets and delivers these
        # again, so yielding (and acking) them now would ack them ahead of the re-read ones.
        await app.on_partitions_revoked.send(set())
        await ctx.put(b"after")
        await until(lambda: list(seen), lambda s: b"after" in s, timeout=5, what="the event after the rebalance")
    assert seen == [b"after"], seen
    assert not any(event.message.acked for event in held), "events from before the rebalance were acked"


@dataclass
class FakeMessage:
    tp: str
    offset: int


@dataclass
class FakeEvent:
    message: FakeMessage


class FakeConsumer:
    def __init__(self, highwaters: dict[str, int]) -> None:
        self.highwaters = highwaters

    def highwater(self, tp: str) -> int:
        return self.highwaters[tp]


class FakeStream:
    def __init__(self, highwaters: dict[str, int]) -> None:
        self.app = type("FakeApp", (), {"consumer": FakeConsumer(highwaters)})()


def test_behind_means_more_than_a_batch_waits_in_some_partition() -> None:
    batch = [FakeEvent(FakeMessage("a", o)) for o in (10, 11)] + [FakeEvent(FakeMessage("b", 5))]
    # The highwater is the next offset to be written: 12 on `a` means nothing waits behind 11.
    assert not behind(FakeStream({"a": 12, "b": 6}), batch)  # type: ignore[arg-type]
    assert not behind(FakeStream({"a": 15, "b": 6}), batch)  # type: ignore[arg-type]  # 3 wait: not more than the batch
    assert behind(FakeStream({"a": 12, "b": 10}), batch)  # type: ignore[arg-type]  # 4 wait behind offset 5


def test_the_window_grows_under_a_backlog_and_is_short_again_at_once_when_caught_up() -> None:
    within = (0.005, 0.2)
    window = within[0]
    for _ in range(10):  # a catch-up: every batch leaves a backlog behind it
        window = next_window(window, within, backlog=True)
    assert window == 0.2
    # The first batch that leaves nothing behind: the next live event waits 5 ms, not 100.
    assert next_window(window, within, backlog=False) == 0.005


async def test_a_second_take_ready_on_the_same_stream_gets_every_later_event() -> None:
    # What Faust's supervisor does after an actor crashes: a new actor on the same stream, while
    # the old generator is not closed yet. Its processor must not stay behind filling a batch
    # nobody reads: once full it blocked the stream's drainer, and every partition with it.
    app = make_app("replaced")
    seen: list[bytes] = []
    abandoned: list[Any] = []

    @app.agent(app.topic("in", value_serializer="raw"))
    async def agent(stream: Any) -> None:
        old = take_ready(stream, 3, (0.001, 0.01))
        abandoned.append(old)  # kept alive, never closed: as a crashed actor's generator
        seen.extend(event.value for event in await old.__anext__())
        async for batch in take_ready(stream, 3, (0.001, 0.01)):
            seen.extend(event.value for event in batch)

    async with agent.test_context() as ctx:
        await ctx.put(b"first")
        await until(lambda: list(seen), lambda s: s == [b"first"], timeout=5, what="the old actor's batch")
        for i in range(10):  # more than the old processor's batch of 3
            await ctx.put(b"%d" % i)
        await until(lambda: list(seen), lambda s: s[1:] == [b"%d" % i for i in range(10)], timeout=10,
                    what="every event after the replacement")

"""The consumer's liveness rule (app/ops/liveness.py): what counts as a stall, and that the worker
then exits for its supervisor, after reporting it.

The consumer objects are stand-ins with the attributes the rule reads from aiokafka 0.14.0 and
mode 0.7.1 (the same ones `app.faust_compat` names): the states are set directly, so each case
is exact. That the real objects carry those attributes is checked by
tests/ops/test_consumer_state.py against a running worker.
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from app.ops.liveness import STALL_EXIT_CODE, ConsumerLiveness

TP0 = TopicPartition("orders-v2", 0)


class Task:
    """A stand-in for an asyncio task: running, or done with an exception."""

    def __init__(self, exc: BaseException | None = None, done: bool = False) -> None:
        self._exc, self._done = exc, done or exc is not None

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return self._exc



def fake_app(*, fetched_ago: float | None = 0.0, in_flight: bool = False, buffered: bool = False,
             paused: bool = False, queued: int = 0) -> Any:
    state = SimpleNamespace(paused=paused, has_valid_position=True, position=0, highwater=0,
                            timestamp=None if fetched_ago is None else (time.time() - fetched_ago) * 1000)
    assignment = SimpleNamespace(tps=[TP0], state_value=lambda tp: state)
    consumer = SimpleNamespace(
        _closed=False,
        _fetcher=SimpleNamespace(_fetch_task=Task(), _in_flight={1} if in_flight else set(),
                                 _records={TP0: object()} if buffered else {}),
        _coordinator=SimpleNamespace(_coordination_task=Task(), _heartbeat_task=Task(), _commit_refresh_task=Task()),
        _subscription=SimpleNamespace(subscription=SimpleNamespace(assignment=assignment)),
    )
    recovery_future = Task()
    recovery_future.__wrapped__ = SimpleNamespace(__qualname__="Recovery._restart_recovery")  # type: ignore[attr-defined]
    recovery = SimpleNamespace(_futures={recovery_future}, completed=SimpleNamespace(is_set=lambda: True),
                               in_recovery=False)
    # The channel the drain loop delivers orders-v2 into (the Conductor's iterator clone owns the queue).
    channel = SimpleNamespace(topics={"orders-v2"}, _queue=SimpleNamespace(qsize=lambda: queued))
    return SimpleNamespace(should_stop=False, rebalancing=False, agents={}, topics=[channel],
                           consumer=SimpleNamespace(_thread=SimpleNamespace(_consumer=consumer), flow_active=True,
                                                    _active_partitions={TP0}, _paused_partitions=set(),
                                                    _buffered_partitions=set(), _read_offset={TP0: 10}),
                           flow_control=SimpleNamespace(is_active=lambda: True),
                           tables=SimpleNamespace(recovery=recovery))


def liveness(app: Any, exits: list[int]) -> ConsumerLiveness:
    return ConsumerLiveness(app, stall_after=30.0, grace=2.0, exit=exits.append)


def test_a_dead_commit_refresh_task_is_a_stall_and_the_worker_exits_after_reporting_it() -> None:
    app, exits = fake_app(), []
    rule = liveness(app, exits)
    assert rule.check(now=0.0) == "" and not exits
    coordinator = app.consumer._thread._consumer._coordinator
    coordinator._commit_refresh_task = Task(RuntimeError("Unknown error fetching offsets"))
    why = rule.check(now=1.0)
    assert "commit_refresh task ended" in why and "Unknown error fetching offsets" in why
    assert rule.stalled == why and not exits, "readiness must be able to report it first"
    rule.check(now=3.5)
    assert exits == [STALL_EXIT_CODE]


def test_a_dead_fetch_task_is_a_stall() -> None:
    app, exits = fake_app(), []
    app.consumer._thread._consumer._fetcher._fetch_task = Task(RuntimeError("Unexpected error in fetcher routine"))
    assert "fetcher task ended" in liveness(app, exits).check(now=0.0)


def test_partitions_not_fetched_with_no_request_out_are_a_stall_after_stall_after_seconds() -> None:
    app, exits = fake_app(fetched_ago=None), []
    rule = liveness(app, exits)
    assert rule.check(now=0.0) == ""
    assert rule.check(now=29.0) == ""
    assert "no fetch response for 30 s on 1 assigned partition" in rule.check(now=30.0)


@pytest.mark.parametrize("case", ["a fetch is out (broker down or paused)", "records wait for the agents",
                                  "the partition is paused", "fetched recently"])
def test_what_is_not_a_stall(case: str) -> None:
    app = fake_app(fetched_ago=0.0 if case == "fetched recently" else None,
                   in_flight=case.startswith("a fetch is out"), buffered=case.startswith("records wait"),
                   paused=case.endswith("paused"), queued=5 if case.startswith("records wait") else 0)
    rule = liveness(app, [])
    assert rule.check(now=0.0) == "" and rule.check(now=100.0) == "", case


def test_a_recovery_loop_that_ended_is_a_stall() -> None:
    app, exits = fake_app(), []
    rule = liveness(app, exits)
    assert rule.check(now=0.0) == ""
    app.tables.recovery._futures.clear()  # mode forgets a service's task once it is done
    assert "table recovery loop ended" in rule.check(now=1.0)


def test_fetched_records_nobody_takes_while_every_delivery_queue_is_empty_are_a_stall() -> None:
    # The drain loop hands fetched messages to the agents' queues; when it stops, records wait
    # in the fetcher and every queue it fills is empty (a full one would be back-pressure).
    app, exits = fake_app(buffered=True), []
    queue = app.topics[0]._queue
    rule = liveness(app, exits)
    assert rule.check(now=0.0) == "" and rule.check(now=4.0) == ""
    assert "fetched records not taken for 5 s" in rule.check(now=5.0)
    busy = liveness(app, [])
    queue.qsize = lambda: 3  # the agents have work: back-pressure, not a stall
    assert busy.check(now=0.0) == "" and busy.check(now=100.0) == ""
    app.rebalancing = True  # the drain loop waits for a rebalance, as it should
    queue.qsize = lambda: 0
    rebalancing = liveness(app, [])
    assert rebalancing.check(now=0.0) == "" and rebalancing.check(now=100.0) == ""


def test_a_drain_loop_that_delivers_slowly_while_every_queue_is_empty_is_not_a_stall() -> None:
    # A loop working through another partition's long run of records (standby changelogs the
    # recovery takes as fast as they come) keeps the queues at 0 while these records wait.
    app, exits = fake_app(buffered=True), []
    rule = liveness(app, exits)
    for second in range(12):
        app.consumer._read_offset[TP0] += 1  # a message delivered since the last look
        assert rule.check(now=float(second)) == ""
    # Once it delivers nothing more, the records waiting are a stall again, 5 s on.
    assert rule.check(now=12.0) == "" and rule.check(now=16.0) == ""
    assert "fetched records not taken for 5 s" in rule.check(now=17.0)
    assert exits == []


def test_nothing_is_a_stall_while_the_worker_stops() -> None:
    app, exits = fake_app(), []
    app.consumer._thread._consumer._fetcher._fetch_task = Task(done=True)
    app.should_stop = True
    assert liveness(app, exits).check(now=0.0) == "" and not exits

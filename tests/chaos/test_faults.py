"""Each fault, under load, on a stack of its own: nothing lost, nothing reordered, everything agrees.

The promises are checked by `chaos.checker` (see its docstring); each test appends its row
to `test-artifacts/chaos-report.md`. `make chaos` runs the same faults as a longer soak.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from app.kafka import topic_partitions
from app.topology import inbox_dead_letter_topic
from app.wire.schemas import dlq_topic
from chaos.checker import Report, count_messages
from chaos.run import Session
from chaos.suite import run_fault
from tests.chaos.conftest import REPORT


@pytest.fixture
async def session(tmp_path: Path) -> AsyncIterator[Session]:
    s = await Session.start(tmp_path / "stack")
    try:
        yield s
    finally:
        await s.stop()


async def run(session: Session, name: str) -> Report:
    """Run fault `name` under load at the suite's settings (`chaos.suite`); the report is kept,
    and every promise must hold."""
    report = await run_fault(session, name)
    REPORT.parent.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError), REPORT.open("x") as new:  # "x": once, whichever test process is first
        new.write(Report.HEADER + "\n")
    with REPORT.open("a") as out:
        out.write(report.row() + "\n")
    reads = {t: {"messages": log.messages, "events": len(log.events), "errors": log.errors[:3]}
             for t, log in session.checker.logs.items()}
    assert report.ok, f"{report.row()}\n{report.examples}\nread: {reads}\nlogs: {session.stack.root}"
    assert report.writes > 0 and report.rolled_back > 0, "the load generator did not write"
    # Summed over the live workers' /metrics (0 while a worker does not export the counter yet).
    assert report.commits_past_unacked == 0, report.row()
    return report


async def test_worker_killed_five_times_under_load_loses_nothing(session: Session) -> None:
    report = await run(session, "worker-kill")
    assert report.notes["kills"] == 5  # live workers that died of SIGKILL (chaos/faults.py)
    # A worker takes longer than the 6 s `ready_within` to join Tansu's group and recover, so
    # restarts are crashed into during start-up and recovery too: the hardest kills.
    assert report.notes["killed before ready"] >= 1, report.notes


async def test_broker_paused_for_20_seconds_loses_nothing(session: Session) -> None:
    await run(session, "broker-pause")


async def test_postgres_restart_under_load_loses_no_committed_write(session: Session) -> None:
    report = await run(session, "postgres-restart")
    assert report.retried > 0, "no write failed: the restart did not hit the load"


async def test_redis_restarted_and_flushed_under_load_leaves_no_stale_entry(session: Session) -> None:
    report = await run(session, "redis-restart")
    # The flush emptied a cache the agent had refilled since the restart: both losses happened.
    assert report.notes["_flushed keys"] > 0, report.notes


async def test_surviving_worker_takes_over_partitions_and_relay(session: Session) -> None:
    report = await run(session, "worker-takeover")
    assert report.notes["workers alive"] == 1


async def test_poison_on_every_input_topic_is_dead_lettered_and_never_stops_the_worker(session: Session) -> None:
    report = await run(session, "poison")
    assert report.notes["workers alive"] == 1
    bootstrap = session.stack.settings.bootstrap_servers
    for topic in report.notes["_poisoned"]:
        letters = await count_messages(bootstrap, dlq_topic(topic), at_least=1000)
        assert letters >= 1000, f"{dlq_topic(topic)} holds {letters} dead letters, expected 1000"


async def test_worker_paused_20_seconds_catches_up(session: Session) -> None:
    report = await run(session, "worker-pause")
    assert report.converge_s is not None  # the catch-up time, in the report's table


async def test_worker_added_during_a_backlog_leaves_every_view_equal_to_the_database(session: Session) -> None:
    report = await run(session, "worker-added")
    assert report.notes["workers alive"] == 2, report.notes
    await views_agree_through_the_second_worker(session, report)


async def test_two_workers_started_onto_a_backlog_agree_with_the_database(session: Session) -> None:
    report = await run(session, "two-onto-backlog")
    assert report.notes["killed"] == 2 and report.notes["workers alive"] == 2, report.notes
    await views_agree_through_the_second_worker(session, report)


async def test_rolling_restarts_of_two_workers_lose_nothing(session: Session) -> None:
    # Three rounds of: SIGKILL one worker and start it again, SIGTERM the other and start it
    # again, each start waited for until ready. `run` gives every stage 60 s after the last
    # restart to agree with the database through the first worker; the second gets the rest.
    report = await run(session, "rolling-restart")
    assert report.notes["kills"] == 3 and report.notes["graceful stops"] == 3, report.notes
    assert report.notes["workers alive"] == 2, report.notes
    assert report.converge_s is not None
    await views_agree_through_the_second_worker(session, report, timeout=60 - report.converge_s)
    # The writers saw no error: no write failed (each failed attempt is retried and counted),
    # and no COMMIT's outcome was unknown; a write that finds its row gone ("missing") can
    # only follow an ambiguous create, so none did either.
    assert report.retried == 0 and report.ambiguous == 0, report.row()


async def views_agree_through_the_second_worker(session: Session, report: Report, timeout: float = 30) -> None:
    """The views were checked through the first worker; the second must give the same answers
    (it forwards lookups to each key's owner, so it must know every owner: no "rebalancing")."""
    second = session.stack.alive_workers[1]
    asked = Report(f"views asked of {second.name}", writes=report.writes, ambiguous=report.ambiguous)
    again = await session.checker.converge(asked, second.url, timeout=timeout)
    assert again.consistent and again.converge_s is not None, (again.row(), again.examples)


async def test_billing_killed_four_times_under_load_keeps_one_invoice_per_paid_order(session: Session) -> None:
    # `run` checks the invoices against the orders: none missing, doubled, wrong or unexpected.
    report = await run(session, "billing-kill")
    assert report.notes["billing kills"] == 4, report.notes  # live billing processes that died of SIGKILL
    billing = session.stack.billing
    assert billing is not None and billing.alive
    assert session.checker.logs["invoices-v1"].events, "billing's writes raised no event"
    # Crashes are no reason to give up on an event: nothing valid was dead-lettered.
    assert await messages_on(session, inbox_dead_letter_topic("orders-v2", "billing")) == 0


async def messages_on(session: Session, topic: str) -> int:
    """Messages on `topic` (the sum of its partitions' end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=session.stack.settings.bootstrap_servers)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(await topic_partitions(consumer, topic))).values())
    finally:
        await consumer.stop()


async def test_storm_of_every_fault_at_once_loses_nothing(session: Session) -> None:
    # Crashes while the broker is frozen and the database and cache restart, with poison: the
    # faults interact (a restarted worker meets a paused broker, retries meet a dead database).
    report = await run(session, "storm")
    assert report.notes["kills"] == 2, report.notes
    assert report.notes["poison per topic"] == 200 and report.notes["workers alive"] == 1

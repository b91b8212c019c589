"""The worker's ops endpoints and watchdog on a real worker under load: /metrics, /health/*, restarts.

The worker runs `tests/stall_app.py`: the real app plus two agents that stall or crash on
purpose, with the watchdog tuned to seconds.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import faust
import pytest
from aiokafka import AIOKafkaProducer
from faust.types import TP
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.embedded.process import free_port
from app.kafka import ensure_topics
from app.main import create_app
from app.ops.actors import await_chain, await_leaf
from app.ops.offsets import PartitionOffsets, agent_lag
from app.ops.progress import AgentProgress, ProgressSensor
from app.ops.watchdog import AgentWatch, Watchdog, WatchdogPolicy
from app.orm import Database
from app.settings import Settings
from app.topology import evented_topics
from models import Order
from tests.http import get_text as get
from tests.processes import ROOT, app_env, stop, wait_for_log
from tests.waiting import until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

#: Every metric family the worker must export (names as the parser gives them: no `_total`).
FAMILIES = {
    "mse_relay_published", "mse_relay_batches", "mse_relay_errors", "mse_relay_active", "mse_relay_connected",
    "mse_outbox_lag_rows", "mse_outbox_lag_seconds",
    "mse_agent_events", "mse_agent_events_received", "mse_agent_errors", "mse_agent_restarts",
    "mse_agent_in_flight", "mse_agent_lag_messages", "mse_agent_idle_seconds", "mse_agent_up", "mse_agent_failing",
    "mse_agent_stuck",
    "mse_dead_letters", "mse_downconverted",
    "mse_cache_hits", "mse_cache_misses", "mse_cache_fills", "mse_cache_refreshes", "mse_cache_stale_rejections",
    "mse_cache_redis_errors", "mse_cache_db_loads", "mse_cache_redis_bypassed",
    "mse_table_keys", "mse_consumer_highwater", "mse_consumer_committed_offset", "mse_consumer_read_offset",
    "mse_consumer_lag", "mse_ready",
}


@dataclass
class OpsWorker:
    """The worker process, its web address and log, its test topics, and what readiness said as it started."""

    child: subprocess.Popen[bytes]
    url: str
    log: Path
    stall_topic: str
    stuck_topic: str
    app_id: str
    readiness: list[tuple[int, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
async def worker(settings: Settings, schema: None, redis_url: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OpsWorker]:
    """A stall-app worker with a group of its own; readiness is polled from the moment it is spawned."""
    run = uuid.uuid4().hex[:8]
    stall_topic, stuck_topic = f"ops-stall-{run}", f"ops-stuck-{run}"
    # Topics a consumer subscribes to must exist before it joins, or it gets no partitions of them.
    await ensure_topics(settings, [*evented_topics(), stall_topic, stuck_topic])
    log = tmp_path_factory.mktemp("ops-worker") / "worker.log"
    port = free_port()
    env = app_env(settings, APP_ID=f"mse-ops-{run}", WEB_PORT=str(port), REDIS_URL=redis_url,
                  STALL_TOPIC=stall_topic, STUCK_TOPIC=stuck_topic)
    with open(log, "ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "faust", "-A", "tests.stall_app", "worker", "-l", "info"],
                                 cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    w = OpsWorker(child, f"http://127.0.0.1:{port}", log, stall_topic, stuck_topic, f"mse-ops-{run}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = await get(w.url + "/health/ready", timeout=2)
                w.readiness.append((status, json.loads(body)))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                w.readiness.append((0, None))  # not listening yet
            if w.readiness[-1][0] == 200:
                break
            assert child.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"never ready: {w.readiness[-1]}\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.05)
        await wait_for_log(log, "[^Worker]: Ready", child)
        yield w
    finally:
        stop(child)


async def scrape(w: OpsWorker) -> tuple[set[str], Samples]:
    """The worker's metric family names and samples ((name, labels) -> value)."""
    status, text = await get(w.url + "/metrics")
    assert status == 200, text
    names, samples = set(), {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def produce(settings: Settings, topic: str, *values: bytes, key: bytes = b"k") -> None:
    """Send `values` to `topic`, all with one key (so one partition, in order)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        for v in values:
            await producer.send_and_wait(topic, v, key=key)
    finally:
        await producer.stop()


async def write_orders(db: Database, n: int, customer_id: int) -> list[Order]:
    """`n` orders written through the ORM in one transaction (the worker's relay publishes them)."""
    async with db.session() as s:
        orders = [Order(customer_id=customer_id, amount_cents=100 + i, currency="EUR") for i in range(n)]
        s.add_all(orders)
    return orders


def test_each_app_exports_every_family_from_a_registry_of_its_own() -> None:
    apps = [create_app(Settings(app_id=f"unit-{i}", redis_url="redis://127.0.0.1:1/0")) for i in range(2)]
    texts = [generate_latest(a.ops.registry).decode() for a in apps]  # type: ignore[attr-defined]
    for text in texts:
        assert FAMILIES <= {family.name for family in text_string_to_metric_families(text)}
    assert apps[0].ops.registry is not apps[1].ops.registry  # type: ignore[attr-defined]
    assert "mse_" not in generate_latest(REGISTRY).decode()  # nothing in the global registry
    # Not started: not ready, and says why.
    ready, reasons = apps[0].ops.ready()  # type: ignore[attr-defined]
    assert not ready and any("recovery" in r for r in reasons) and any("relay" in r for r in reasons)


def test_a_worker_without_the_relay_leaves_its_families_and_readiness_to_the_relay_process() -> None:
    app = create_app(Settings(app_id="unit-no-relay", redis_url="redis://127.0.0.1:1/0",
                              relay_mode="off"))
    assert app.ops.sources.relay is None  # type: ignore[attr-defined]
    text = generate_latest(app.ops.registry).decode()  # type: ignore[attr-defined]
    names = {family.name for family in text_string_to_metric_families(text)}
    relay_families = {n for n in FAMILIES if n.startswith(("mse_relay_", "mse_outbox_lag_"))}
    assert relay_families and not names & relay_families, "no zeros that would read as 'no outbox lag'"
    assert FAMILIES - relay_families <= names
    ready, reasons = app.ops.ready()  # type: ignore[attr-defined]
    assert not ready and not any(r.startswith("relay") for r in reasons)


def test_agent_lag_counts_messages_past_the_agents_own_position() -> None:
    a, b = TP("t", 0), TP("t", 1)
    offsets = [PartitionOffsets(a, highwater=10, committed=4, read=9),
               PartitionOffsets(b, highwater=7, committed=None, read=None),
               PartitionOffsets(TP("other", 0), highwater=99, committed=0, read=0)]
    fresh = AgentProgress()
    assert agent_lag(fresh, {"t"}, offsets) == (10 - 4) + 7  # nothing done here: from the committed offset
    progress = AgentProgress(offsets={a: 8, b: 6})
    assert agent_lag(progress, {"t"}, offsets) == 1  # offset 9 of partition 0
    behind = AgentProgress(offsets={a: 1})  # older than the group's commit (after a rebalance)
    assert agent_lag(behind, {"t"}, offsets[:1]) == 6
    assert offsets[1].lag == 7 and PartitionOffsets(a, None, 3, None).lag is None


async def test_await_leaf_stays_put_while_parked_and_changes_in_a_retry_loop() -> None:
    stop = asyncio.Event()

    async def parked() -> None:
        await asyncio.Event().wait()

    async def retrying() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.01)

    actors = [SimpleNamespace(it=parked()), SimpleNamespace(it=retrying())]
    tasks = [asyncio.create_task(a.it) for a in actors]  # type: ignore[arg-type]
    first = await until(lambda: [await_leaf(a) for a in actors],  # type: ignore[arg-type]
                        lambda leaves: all(leaf is not None and leaf is not a.it for leaf, a in zip(leaves, actors)),
                        what="both coroutines started and waiting")
    # The retry loop's leaf changes with every sleep; by then the parked one had every chance to.
    await until(lambda: await_leaf(actors[1]) is not first[1], what="the retry loop moved on")  # type: ignore[arg-type]
    second = [await_leaf(a) for a in actors]  # type: ignore[arg-type]
    assert first[0] is second[0]  # the same pending future (its iterator), for as long as it is parked
    assert await_chain(actors[0]).startswith("parked > wait")  # type: ignore[arg-type]  # named in stuck reports
    assert first[1] is not second[1]
    stop.set()
    tasks[0].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_restarts_back_off_once_an_agent_is_failing() -> None:
    dog = Watchdog(create_app(Settings(app_id="unit-dog")), ProgressSensor(faust.App("unit-sensor")),
                   WatchdogPolicy(stall_after=10, max_attempts=2, max_backoff=35))
    watch = AgentWatch(since=0.0, last_restart=100.0)
    waits = []
    for attempts in range(5):
        watch.attempts = attempts
        waits.append(next(t for t in range(0, 100) if dog._may_restart(watch, 10, 100.0 + t)))
    assert waits == [10, 10, 20, 35, 35]
    assert WatchdogPolicy().stall_seconds(dog.app) == dog.app.conf.producer_request_timeout + 60


def test_an_agent_idle_with_lag_or_retrying_one_batch_is_stuck_after_the_setting() -> None:
    app = create_app(Settings(app_id="unit-stuck", stuck_after=30))
    dog = Watchdog(app, ProgressSensor(app), WatchdogPolicy(stuck_after=30))
    watch, progress = AgentWatch(since=0.0), AgentProgress(last_processed=5.0)
    dog.watches["a"] = watch
    dog._check_stuck("a", watch, progress, lag=0, now=1000.0)  # idle for long, but nothing waits
    assert watch.stuck == "" and watch.state == "running"
    dog._check_stuck("a", watch, progress, lag=3, now=1001.0)  # lag appears: the clock starts now
    dog._check_stuck("a", watch, progress, lag=3, now=1030.0)
    assert watch.stuck == ""
    dog._check_stuck("a", watch, progress, lag=3, now=1031.0)
    assert watch.stuck == "no event finished for 30 s while 3 message(s) wait" and watch.state == "stuck"
    progress.last_processed = 1031.5  # it moved: no longer stuck
    dog._check_stuck("a", watch, progress, lag=3, now=1032.0)
    assert watch.stuck == "" and dog.stuck() == {}
    # Retrying one batch counts from the first failure, lag or not, and names the error.
    retrying = dog.retries.failed("a", ConnectionError("Too many connections"))
    retrying.since = 2000.0
    dog._check_stuck("a", watch, progress, lag=0, now=2029.0)
    assert watch.stuck == ""
    dog._check_stuck("a", watch, progress, lag=0, now=2030.0)
    assert dog.stuck() == {"a": "retrying the same batch for 30 s (1 attempts): ConnectionError: Too many connections"}
    dog.retries.succeeded("a")
    dog._check_stuck("a", watch, progress, lag=0, now=2031.0)
    assert dog.stuck() == {}


async def test_readiness_flips_from_503_to_200_while_the_worker_starts(worker: OpsWorker) -> None:
    statuses = [status for status, _ in worker.readiness]
    assert statuses[-1] == 200
    assert 503 in statuses, statuses
    # Once up, the server never said ready before it was.
    answered = [s for s in statuses if s]
    assert answered.index(200) == len(answered) - 1
    first = next(body for status, body in worker.readiness if status == 503)
    assert first["error"] == "not ready" and first["reasons"], first


async def test_liveness_answers_while_the_event_loop_runs(worker: OpsWorker) -> None:
    status, body = await get(worker.url + "/health/live")
    assert status == 200 and json.loads(body)["status"] == "live"


async def test_the_worker_serves_the_asyncapi_document_the_cli_prints(worker: OpsWorker, settings: Settings,
                                                                      redis_url: str) -> None:
    status, body = await get(worker.url + "/asyncapi.json")
    assert status == 200
    # The same configuration as the worker's (its group id; with Redis, the cache agent reads).
    cli = subprocess.run([sys.executable, "-m", "app", "asyncapi"], cwd=ROOT,
                         env=app_env(settings, REDIS_URL=redis_url, APP_ID=worker.app_id),
                         capture_output=True, check=True)
    assert json.loads(body) == json.loads(cli.stdout)


async def test_metrics_export_every_stage_and_counters_move_under_load(
        worker: OpsWorker, db: Database, settings: Settings) -> None:
    _, before = await scrape(worker)
    # Load: orders through the ORM for ~3 s (scraped while it runs), a few poison messages,
    # entity reads over HTTP.
    orders: list[Order] = []

    async def load() -> None:
        for i in range(30):
            orders.extend(await write_orders(db, 25, customer_id=9100 + i))
            await asyncio.sleep(0.1)

    writer = asyncio.create_task(load())
    during = []
    while not writer.done():
        during.append((await scrape(worker))[1])
        await asyncio.sleep(0.5)
    await writer
    published = [value(s, "mse_relay_published_total") for s in during]
    views = [value(s, "mse_agent_events_total", agent="process_orders") for s in during]
    assert len(during) >= 3 and published == sorted(published) and published[-1] > published[0], published
    assert views[-1] > views[0], views
    await produce(settings, "orders-v2", b"\x00not avro", b"\x01neither", key=b"poison")
    for order in orders[:3]:
        for _ in range(2):  # a miss (or a hit if the agent was first), then a hit
            await get(f"{worker.url}/entities/orders/{order.id}/")

    def cache_decisions(samples: Samples) -> float:
        return (value(samples, "mse_cache_refreshes_total", repository="worker")
                + value(samples, "mse_cache_stale_rejections_total", repository="worker"))

    def unmoved(samples: Samples) -> list[str]:
        """The load's expected effects not seen yet."""
        def up(name: str, **labels: str) -> bool:
            return value(samples, name, **labels) > value(before, name, **labels)
        checks = {
            "relay published": up("mse_relay_published_total") and up("mse_relay_batches_total"),
            # One agent runs down-conversion and the views' stage 1 on each batch of orders-v2.
            "downconvert and views events": up("mse_agent_events_total", agent="process_orders"),
            "cache events": up("mse_agent_events_total", agent="refresh_cache_orders"),
            "downconverted": value(samples, "mse_downconverted_total", topic="orders-v2") >= len(orders),
            # Both poison messages: the two may arrive in different batches.
            "dead letters": value(samples, "mse_dead_letters_total", stage="downconvert", topic="orders-v2.dlq")
            >= value(before, "mse_dead_letters_total", stage="downconvert", topic="orders-v2.dlq") + 2,
            # Redis may be shared with other test runs whose entries have higher sequences:
            # those writes are rejected as stale, which is still the agent deciding.
            "cache refreshes": cache_decisions(samples) >= cache_decisions(before) + len(orders),
            "entity reads": value(samples, "mse_cache_hits_total", repository="worker")
            + value(samples, "mse_cache_misses_total", repository="worker") >= 6,
            "table keys": value(samples, "mse_table_keys", table="orders") >= len(orders),
        }
        return [what for what, ok in checks.items() if not ok]

    async def missing() -> list[str]:
        return unmoved((await scrape(worker))[1])

    await until(missing, lambda left: not left, timeout=30, what="counters of every stage moving")
    names, samples = await scrape(worker)
    assert FAMILIES <= names, FAMILIES - names
    assert value(samples, "mse_dead_letters_total", stage="downconvert", topic="orders-v2.dlq") >= 2
    assert ("mse_dead_letters_total", frozenset({("stage", "relay"), ("topic", "outbox.dlq")})) in samples
    assert value(samples, "mse_relay_connected") == 1 and value(samples, "mse_ready") == 1
    # Outbox lag and consumer lag: gauges per partition of every input topic, nothing left behind.
    assert ("mse_outbox_lag_rows", frozenset()) in samples and ("mse_outbox_lag_seconds", frozenset()) in samples
    partitions = {dict(labels)["partition"] for (name, labels) in samples
                  if name == "mse_consumer_lag" and dict(labels)["topic"] == "orders-v2"}
    assert partitions == {"0", "1", "2", "3"}
    highwaters = (value(samples, "mse_consumer_highwater", topic="orders-v2", partition=p) for p in partitions)
    assert sum(highwaters) >= len(orders)
    for agent in ("process_orders", "refresh_cache_orders"):
        assert value(samples, "mse_agent_up", agent=agent) == 1
        assert value(samples, "mse_agent_errors_total", agent=agent) == 0

    async def caught_up() -> float:
        s = (await scrape(worker))[1]
        return sum(v for (name, labels), v in s.items()
                   if name == "mse_consumer_lag" and dict(labels)["topic"] == "orders-v2")

    # Committed every few seconds (Faust's commit_interval); Tansu's highwater may trail by a batch.
    await until(caught_up, lambda lag: lag <= 4, timeout=30, what="orders-v2 consumer lag back to ~0")


async def test_watchdog_restarts_a_stalled_agent(worker: OpsWorker, settings: Settings) -> None:
    start = worker.log.stat().st_size
    await produce(settings, worker.stall_topic, b"stall", b"after-stall-1", b"after-stall-2")
    await wait_for_log(worker.log, "stall_on_purpose: stalling", worker.child, start=start, timeout=20)
    await wait_for_log(worker.log, "watchdog: restarted agent stall_on_purpose (stalled", worker.child,
                       start=start, timeout=20)
    # The new actor carries on with the events buffered behind the stuck one.
    await wait_for_log(worker.log, "stall_on_purpose: processed after-stall-2", worker.child, start=start, timeout=20)
    _, samples = await scrape(worker)
    assert value(samples, "mse_agent_restarts_total", agent="stall_on_purpose", reason="stalled") == 1
    assert value(samples, "mse_agent_up", agent="stall_on_purpose") == 1
    assert value(samples, "mse_agent_failing", agent="stall_on_purpose") == 0


async def test_a_crashing_agent_is_restarted_and_carries_on(worker: OpsWorker, settings: Settings) -> None:
    _, before = await scrape(worker)
    start = worker.log.stat().st_size
    await produce(settings, worker.stall_topic, b"poison", b"after-poison")
    await wait_for_log(worker.log, "stall_on_purpose: processed after-poison", worker.child, start=start, timeout=20)
    _, samples = await scrape(worker)
    errors = value(samples, "mse_agent_errors_total", agent="stall_on_purpose")
    assert errors == value(before, "mse_agent_errors_total", agent="stall_on_purpose") + 1
    assert value(samples, "mse_agent_restarts_total", agent="stall_on_purpose", reason="crashed") == errors
    assert "agent stall_on_purpose crashed (ValueError: poison value)" in worker.log.read_text()


async def test_an_agent_whose_function_returned_is_restarted(worker: OpsWorker, settings: Settings) -> None:
    start = worker.log.stat().st_size
    await produce(settings, worker.stall_topic, b"quit", b"after-quit")
    await wait_for_log(worker.log, "stall_on_purpose: returning", worker.child, start=start, timeout=20)
    await wait_for_log(worker.log, "watchdog: restarted agent stall_on_purpose (finished", worker.child,
                       start=start, timeout=20)
    await wait_for_log(worker.log, "stall_on_purpose: processed after-quit", worker.child, start=start, timeout=20)
    _, samples = await scrape(worker)
    assert value(samples, "mse_agent_restarts_total", agent="stall_on_purpose", reason="finished") == 1
    assert value(samples, "mse_agent_up", agent="stall_on_purpose") == 1


async def test_an_agent_that_stays_stuck_after_restarts_makes_the_worker_not_ready(
        worker: OpsWorker, settings: Settings) -> None:
    await produce(settings, worker.stuck_topic, *(f"stuck-{i}".encode() for i in range(6)))

    async def ready() -> tuple[int, Any]:
        status, body = await get(worker.url + "/health/ready")
        return status, json.loads(body)

    status, body = await until(ready, lambda r: r[0] == 503, timeout=30, what="not ready")
    assert any("stuck_on_purpose" in reason and "restart" in reason for reason in body["reasons"]), body
    _, samples = await scrape(worker)
    assert value(samples, "mse_agent_restarts_total", agent="stuck_on_purpose", reason="stalled") >= 2
    assert value(samples, "mse_agent_failing", agent="stuck_on_purpose") == 1
    assert value(samples, "mse_ready") == 0
    # Liveness is unaffected: the process is fine, one agent is not.
    assert (await get(worker.url + "/health/live"))[0] == 200


class FakeActor:
    """Just enough of Faust's ActorRef for the watchdog: its coroutine and its task."""

    crashed = False

    def __init__(self, it: Any, task: asyncio.Task[None]) -> None:
        self.it, self.actor_task = it, task

    async def maybe_start(self) -> None:
        """Faust starts the actor's service here; this one runs already."""


async def test_a_parked_agent_is_restarted_only_while_its_input_has_lag() -> None:
    # An actor parked on one await with an event in flight: a deadlock if messages wait for
    # it, but an idle agent with nothing to do must be left alone (it parks like that too).
    app = create_app(Settings(app_id="unit-lag"))
    dog = Watchdog(app, ProgressSensor(app), WatchdogPolicy(stall_after=10))
    stall = dog.policy.stall_seconds(app)
    parked = asyncio.Event()

    async def agent_body() -> None:
        await parked.wait()

    it = agent_body()
    actor = FakeActor(it, asyncio.create_task(it))
    agent = SimpleNamespace(supervisor=SimpleNamespace(_services=[actor]))
    await until(lambda: await_leaf(actor) is not it, what="the actor parked")  # type: ignore[arg-type]
    progress = dog.progress.progress("a")
    progress.received, progress.processed = 5, 4  # one event in flight
    watch = AgentWatch(since=0.0)
    for now, lag in ((1.0, 0), (2.0 + stall, 0), (3.0 + 3 * stall, 0)):
        await dog.check_agent("a", agent, watch, lag, now)  # type: ignore[arg-type]
        assert watch.state == "running" and watch.attempts == 0 and not actor.actor_task.done()
    await dog.check_agent("a", agent, watch, 3, 4.0 + 3 * stall)  # type: ignore[arg-type]
    assert watch.state == "stalled" and watch.attempts == 1 and progress.restarts["stalled"] == 1
    await asyncio.gather(actor.actor_task, return_exceptions=True)
    assert actor.actor_task.cancelled()  # what Faust's supervisor turns into a restart

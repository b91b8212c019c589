"""Prometheus metrics of the worker, read from live stats at scrape time into a per-app registry.

What is counted where:
- Agents: `app.ops.progress.ProgressSensor`, a Faust sensor.
- Consumer offsets and lag: `app.ops.offsets`, from what Faust exposes without network calls.
- Relay, down-conversion, cache and tables: their own stats objects (`RelayStats`,
  `DownconvertCounts`, `CacheStats`, the view tables), read when Prometheus scrapes.

Families (all `mse_`): relay `relay_published_total`, `relay_batches_total`,
`relay_errors_total`, `relay_active`, `relay_connected`, `outbox_lag_rows`,
`outbox_lag_seconds`; agents {agent} `agent_events_total`, `agent_events_received_total`,
`agent_errors_total`, `agent_restarts_total{agent,reason}`, `agent_in_flight`,
`agent_lag_messages`, `agent_idle_seconds`, `agent_up`, `agent_failing`, `agent_stuck`; dead letters
`dead_letters_total{stage,topic}`, `downconverted_total{topic}`; cache {repository}
`cache_{hits,misses,fills,refreshes,stale_rejections,redis_errors,db_loads,redis_bypassed}_total`;
`table_keys{table}`; consumer {topic,partition} `consumer_highwater`,
`consumer_committed_offset`, `consumer_read_offset`, `consumer_lag`; the commit rule
(`app/commits.py`) `consumer_commits_past_unacked_total` (must stay 0),
`consumer_commits_refused_total`, `consumer_reseeks_total`, `consumer_offset_jumps_total{topic,partition}`,
`consumer_commit_held_seconds{topic,partition}`; `ready`.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust
from faust.types import AgentT
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.commits import CommitGuard
from app.ops.offsets import agent_lag, agent_topics, partition_offsets
from app.ops.progress import ProgressSensor
from app.topology import evented_topics

if TYPE_CHECKING:
    from app.cache import CacheStats
    from app.outbox.relay import RelayStats
    from app.outbox.relay_host import RelayHost
    from app.web.tables import View

log = logging.getLogger(__name__)

#: The worker's pipeline stages, in the order the status page shows them.
STAGES = ("relay", "downconvert", "views", "cache")
#: `CacheStats` fields exported, with the metric name each gets (`mse_cache_<name>_total`).
CACHE_FIELDS = {
    "hits": "hits", "misses": "misses", "fills": "fills", "refreshes_applied": "refreshes",
    "stale_rejections": "stale_rejections", "redis_errors": "redis_errors", "db_loads": "db_loads",
    "redis_bypassed": "redis_bypassed",
}


@dataclass
class DownconvertCounts:
    """Events down-converted and dead-lettered per source topic (the down-conversion agents' hook)."""

    converted: Counter[str] = field(default_factory=Counter)
    dead_lettered: Counter[str] = field(default_factory=Counter)

    def __call__(self, topic: str, converted: int, dead_lettered: int) -> None:
        """Add one produced batch."""
        self.converted[topic] += converted
        self.dead_lettered[topic] += dead_lettered


def stages_of(agent: AgentT, sources: set[str]) -> tuple[str, ...]:
    """The pipeline stages an agent's events count for: what its function declares (`stages`,
    e.g. the jobs of a `process_<entity>` agent, agents/entity_pass.py), if it reads event
    topics; an agent that declares none counts for none."""
    if not sources & set(agent.get_topic_names()):
        return ()
    return tuple(getattr(agent.fun, "stages", ()))


# -- what a scrape reads -------------------------------------------------------------------

@dataclass
class Sources:
    """Everything the metrics and the status page read, live."""

    app: faust.App
    progress: ProgressSensor
    relay: RelayHost | None
    downconverted: DownconvertCounts
    views: Mapping[str, View]
    #: label -> CacheStats of the worker's cache repository ("worker"), once opened.
    caches: Callable[[], dict[str, CacheStats]]
    #: Reasons the worker is not ready ([] = ready).
    not_ready: Callable[[], list[str]]
    #: Agents that currently have a running actor.
    running: Callable[[], set[str]]
    #: agent -> why it is stuck (retrying one batch, or no progress with lag; app.ops.watchdog).
    stuck: Callable[[], dict[str, str]] = dict

    def stage_totals(self) -> dict[str, int]:
        """Events each stage has handled so far (relay: published; agents: finished)."""
        totals = dict.fromkeys(STAGES, 0)
        if self.relay is not None:
            totals["relay"] = self.relay.stats.published
        sources = set(evented_topics())
        for name, agent in self.app.agents.items():
            for stage in stages_of(agent, sources):
                if stage in totals and stage != "relay":
                    totals[stage] += self.progress.progress(name).processed
        return totals

    def dead_letters(self) -> dict[tuple[str, str], int]:
        """(stage, dead-letter topic) -> messages dead-lettered by this worker."""
        from app.topology import RELAY_DLQ_TOPIC
        from app.wire.schemas import dlq_topic

        out = {("relay", RELAY_DLQ_TOPIC): self.relay.stats.dead_lettered if self.relay is not None else 0}
        for topic, count in self.downconverted.dead_lettered.items():
            out[("downconvert", dlq_topic(topic))] = count
        return out

    def table_keys(self) -> dict[str, int]:
        """view name -> keys in this worker's copy of the table (active and standby partitions)."""
        return {name: len(view.table.data) for name, view in self.views.items()}


def relay_families(stats: RelayStats) -> Iterator[Metric]:
    """The relay's metric families, from its live stats."""

    def value(name: str) -> float:
        return float(getattr(stats, name))

    yield CounterMetricFamily("mse_relay_published", "Outbox events the relay published to Kafka.",
                              value=value("published"))
    yield CounterMetricFamily("mse_relay_batches", "Outbox batches the relay published.",
                              value=value("batches"))
    yield CounterMetricFamily("mse_relay_errors", "Relay failures (database or broker); it retries.",
                              value=value("errors"))
    yield GaugeMetricFamily("mse_relay_active", "1 while this process's relay holds at least one outbox shard.",
                            value=value("active"))
    yield GaugeMetricFamily("mse_relay_shards", "Outbox shards this process's relay publishes (relays balance them).",
                            value=float(len(stats.shards)))
    yield GaugeMetricFamily("mse_relay_connected", "1 while the relay holds a PostgreSQL connection.",
                            value=value("connected"))
    yield GaugeMetricFamily("mse_outbox_lag_rows", "Outbox rows not published yet (measured by the "
                            "active relay about every second).", value=value("pending_rows"))
    yield GaugeMetricFamily("mse_outbox_lag_seconds", "Age of the oldest unpublished outbox row.",
                            value=value("oldest_seconds"))


class RelayCollector(Collector):
    """The relay's families for a process that runs only the relay (`python -m app relay`)."""

    def __init__(self, stats: RelayStats) -> None:
        self.stats = stats

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not read the live stats."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The current value of every relay metric."""
        yield from relay_families(self.stats)


class OpsCollector(Collector):
    """Builds every `mse_` metric family from `Sources` when the registry is collected."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not read the live stats."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The current value of every metric."""
        s = self.sources
        yield from self._relay()
        yield from self._agents()
        yield from self._dead_letters()
        yield from self._cache()
        tables = GaugeMetricFamily("mse_table_keys", "Keys in this worker's copy of each view table.",
                                   labels=["table"])
        for name, keys in s.table_keys().items():
            tables.add_metric([name], keys)
        yield tables
        yield from self._consumer()
        reasons = s.not_ready()
        yield GaugeMetricFamily("mse_ready", "1 when /health/ready answers 200.", value=0 if reasons else 1)

    def _relay(self) -> Iterator[Metric]:
        relay = self.sources.relay
        if relay is None:
            return  # RELAY_IN_WORKER=0: the relay process exports these (zeros here would read as "no lag")
        yield from relay_families(relay.stats)

    def _agents(self) -> Iterator[Metric]:
        s = self.sources
        now = time.monotonic()
        topics = agent_topics(s.app)
        offsets = partition_offsets(s.app, set().union(*topics.values()) if topics else ())
        running = s.running()
        processed = CounterMetricFamily("mse_agent_events", "Events each agent finished (acked).",
                                        labels=["agent"])
        received = CounterMetricFamily("mse_agent_events_received", "Events each agent took in.",
                                       labels=["agent"])
        errors = CounterMetricFamily("mse_agent_errors", "Exceptions that crashed an agent's actor.",
                                     labels=["agent"])
        restarts = CounterMetricFamily("mse_agent_restarts", "Agent restarts by reason: crashed (Faust's "
                                       "supervisor), stalled, finished or dead (the watchdog).",
                                       labels=["agent", "reason"])
        in_flight = GaugeMetricFamily("mse_agent_in_flight", "Events taken in and not finished.",
                                      labels=["agent"])
        lag = GaugeMetricFamily("mse_agent_lag_messages", "Messages in the agent's assigned input "
                                "partitions it has not finished.", labels=["agent"])
        idle = GaugeMetricFamily("mse_agent_idle_seconds", "Seconds since the agent last finished an "
                                 "event (since the worker started if never).", labels=["agent"])
        up = GaugeMetricFamily("mse_agent_up", "1 while the agent has a running actor.", labels=["agent"])
        failing = GaugeMetricFamily("mse_agent_failing", "1 when the watchdog gave up restarting the agent.",
                                    labels=["agent"])
        stuck = GaugeMetricFamily("mse_agent_stuck", "1 while the agent has retried one batch, or finished "
                                  "nothing with lag, for longer than STUCK_AFTER_S.", labels=["agent"])
        stuck_now = s.stuck()
        for name in sorted(s.app.agents):
            p = s.progress.progress(name)
            processed.add_metric([name], p.processed)
            received.add_metric([name], p.received)
            errors.add_metric([name], p.errors)
            for reason in ("crashed", "stalled", "finished", "dead"):
                restarts.add_metric([name, reason], p.restarts[reason])
            in_flight.add_metric([name], p.in_flight)
            lag.add_metric([name], agent_lag(p, topics.get(name, set()), offsets))
            idle.add_metric([name], now - (p.last_processed or s.progress.installed_at))
            up.add_metric([name], 1 if name in running else 0)
            failing.add_metric([name], 1 if p.failing else 0)
            stuck.add_metric([name], 1 if name in stuck_now else 0)
        yield from (processed, received, errors, restarts, in_flight, lag, idle, up, failing, stuck)

    def _dead_letters(self) -> Iterator[Metric]:
        s = self.sources
        dead = CounterMetricFamily("mse_dead_letters", "Messages sent to a dead-letter topic, by stage.",
                                   labels=["stage", "topic"])
        for (stage, topic), count in sorted(s.dead_letters().items()):
            dead.add_metric([stage, topic], count)
        yield dead
        converted = CounterMetricFamily("mse_downconverted", "Events down-converted to older versions.",
                                        labels=["topic"])
        for topic, count in sorted(s.downconverted.converted.items()):
            converted.add_metric([topic], count)
        yield converted

    def _cache(self) -> Iterator[Metric]:
        caches = self.sources.caches()
        for attribute, name in CACHE_FIELDS.items():
            family = CounterMetricFamily(f"mse_cache_{name}", f"Cache repository {attribute.replace('_', ' ')}.",
                                         labels=["repository"])
            for label, stats in sorted(caches.items()):
                family.add_metric([label], getattr(stats, attribute))
            yield family

    def _consumer(self) -> Iterator[Metric]:
        s = self.sources
        topics = set().union(*agent_topics(s.app).values())
        highwater = GaugeMetricFamily("mse_consumer_highwater", "High watermark of each assigned input "
                                      "partition (the consumer's latest fetch).", labels=["topic", "partition"])
        committed = GaugeMetricFamily("mse_consumer_committed_offset", "Committed offset of each assigned "
                                      "input partition.", labels=["topic", "partition"])
        read = GaugeMetricFamily("mse_consumer_read_offset", "Last offset the consumer handed to streams.",
                                 labels=["topic", "partition"])
        lag = GaugeMetricFamily("mse_consumer_lag", "Messages not committed yet (highwater - committed).",
                                labels=["topic", "partition"])
        for p in partition_offsets(s.app, topics):
            labels = [p.tp.topic, str(p.tp.partition)]
            if p.highwater is not None:
                highwater.add_metric(labels, p.highwater)
            if p.committed is not None:
                committed.add_metric(labels, p.committed)
            if p.read is not None:
                read.add_metric(labels, p.read)
            if p.lag is not None:
                lag.add_metric(labels, p.lag)
        yield from (highwater, committed, read, lag)
        yield from commit_guard_families(getattr(s.app.consumer, "commit_guard", None))


def commit_guard_families(guard: CommitGuard[Any] | None) -> Iterator[Metric]:
    """What the commit rule (app/commits.py) refused, held and healed on this worker."""
    if guard is None:
        return
    now = time.monotonic()
    yield CounterMetricFamily("mse_consumer_commits_past_unacked", "Commits made while the committed offset "
                              "was not the lowest acked one (must stay 0).", value=guard.commits_past_unacked)
    yield CounterMetricFamily("mse_consumer_commits_refused", "Commits Faust's own rule would have made past "
                              "an offset no agent finished; held instead.", value=guard.commits_refused)
    yield CounterMetricFamily("mse_consumer_reseeks", "Input partitions read again from a message no agent "
                              "finished while later ones were.", value=guard.reseeks)
    jumps = CounterMetricFamily("mse_consumer_offset_jumps", "Deliveries that skipped offsets (logged, never "
                                "counted as processed).", labels=["topic", "partition"])
    for tp, count in sorted(guard.offset_jumps.items()):
        jumps.add_metric([tp.topic, str(tp.partition)], count)
    yield jumps
    held = GaugeMetricFamily("mse_consumer_commit_held_seconds", "How long each input partition's commit has "
                             "waited for an unprocessed head offset.", labels=["topic", "partition"])
    for tp, since in sorted(guard.held_since.items()):
        held.add_metric([tp.topic, str(tp.partition)], now - since)
    yield held


def new_registry(sources: Sources) -> CollectorRegistry:
    """A registry of the app's own (never the global one), so apps and tests never share metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OpsCollector(sources))
    return registry
